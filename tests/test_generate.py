"""`l1ra-lite generate`: the adapter on its base, through the chat template."""

from __future__ import annotations

import io

import pytest
import torch
from test_export import make_run

from l1ra_lite.cli import main as cli_main
from l1ra_lite.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("gen"), quant="nf4", compute_dtype="float32")


@pytest.fixture(scope="module")
def loaded(run_dir):
    from l1ra_lite.finished_run import read_run
    from l1ra_lite.generate import load_for_generation

    return load_for_generation(read_run(run_dir), device="cpu")


def test_loaded_like_training_nf4_base_and_peft_adapter(loaded):
    import bitsandbytes as bnb
    from peft import PeftModel

    model, _ = loaded
    assert isinstance(model, PeftModel)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14  # every adapted projection sits on an NF4 weight


def test_reply_continues_the_chat_templated_prompt(loaded):
    from l1ra_lite.generate import generate_reply

    model, tokenizer = loaded
    messages = [{"role": "user", "content": "hello world"}]
    reply = generate_reply(model, tokenizer, messages, max_new_tokens=6, temperature=0)
    templated = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert reply.prompt_ids == tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert reply.output_ids[: len(reply.prompt_ids)] == reply.prompt_ids
    new = reply.output_ids[len(reply.prompt_ids) :]
    assert 1 <= len(new) <= 6
    # greedy: every generated token is the argmax of the adapter model's next-token logits
    with torch.no_grad():
        logits = model(torch.tensor([reply.output_ids[:-1]])).logits[0]
    assert logits[len(reply.prompt_ids) - 1 :].argmax(-1).tolist() == new
    assert reply.text == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_chat_loop_keeps_the_conversation(loaded):
    from l1ra_lite.generate import chat_loop, generate_reply, prompt_ids

    model, tokenizer = loaded
    seen = []

    def answer(messages):
        seen.append(prompt_ids(tokenizer, messages))
        return generate_reply(model, tokenizer, messages, max_new_tokens=3, temperature=0)

    out = io.StringIO()
    messages = chat_loop(answer, io.StringIO("hello\nhow are you\n\nignored\n"), out)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "how are you"
    assert seen[1][: len(seen[0])] == seen[0]  # the second prompt carries the first exchange
    assert out.getvalue().count("model> ") == 2


def test_cli_generate_prints_the_greedy_answer(run_dir, loaded, capsys):
    from l1ra_lite.generate import generate_reply

    model, tokenizer = loaded
    expected = generate_reply(model, tokenizer, [{"role": "user", "content": "the quick fox"}], 5, 0).text
    code = cli_main(
        ["generate", str(run_dir), "--prompt", "the quick fox", "--max-new-tokens", "5", "--temperature", "0"]
    )
    assert code == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_cli_generate_not_a_run(tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_system_message_comes_first_in_the_templated_prompt(loaded):
    from l1ra_lite.generate import check_system_message, generate_reply

    model, tokenizer = loaded
    opening = [{"role": "system", "content": "You answer in French."}]
    check_system_message(tokenizer, opening)
    reply = generate_reply(model, tokenizer, opening + [{"role": "user", "content": "hello"}], 2, 0)
    templated = "<|im_start|>system\nYou answer in French.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    assert reply.prompt_ids == tokenizer(templated + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def test_system_message_a_template_refuses_or_drops_is_one_line(loaded):
    import copy

    from l1ra_lite.generate import check_system_message

    _, tokenizer = loaded
    opening = [{"role": "system", "content": "Be brief."}]
    refusing = copy.copy(tokenizer)
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match="refuses a system message.*System role not supported"):
        check_system_message(refusing, opening)
    dropping = copy.copy(tokenizer)
    dropping.chat_template = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="leaves system messages out"):
        check_system_message(dropping, opening)


def test_chat_alias_is_generate_without_a_prompt_and_keeps_the_system_message(run_dir, loaded, monkeypatch, capsys):
    from l1ra_lite.generate import generate_reply

    model, tokenizer = loaded
    system = [{"role": "system", "content": "Be brief."}]
    expected = generate_reply(model, tokenizer, system + [{"role": "user", "content": "the quick fox"}], 4, 0).text
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick fox\n\n"))
    args = [str(run_dir), "--system", "Be brief.", "--max-new-tokens", "4", "--temperature", "0"]
    assert cli_main(["chat", *args]) == 0
    assert f"model> {expected}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # chat has no --prompt: that is what generate is for
        cli_main(["chat", str(run_dir), "--prompt", "hi"])
