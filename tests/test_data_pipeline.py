"""Tests for the Arrow pipeline of l1ra_lite.data: the on-disk cache, examples read by index
from memory-mapped files, parallel preparation, dataset conventions (ShareGPT, system turns,
mixed sources, a separate eval set, dataset folders with subsets and splits, chat template
choice) and packing without cross-example attention."""

from __future__ import annotations

import json

import pytest
import torch

from l1ra_lite.data import IGNORE_INDEX, Examples, collate, load_rows, pack, pipeline, prepare_data
from l1ra_lite.data.templates import use_chat_template
from l1ra_lite.errors import UserError
from tests.tiny import EOS, SMOLLM2_TEMPLATE, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def qa_rows(n, start=0):
    return [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(start, start + n)]


def prepare(path, tokenizer, cache=None, **options):
    args = dict(seq_len=64, packing=False, eval_fraction=0.1, eval_max_rows=10, seed=3)
    args.update({k: options.pop(k) for k in list(options) if k in args})
    return prepare_data(str(path), tokenizer, cache_dir=cache, **args, **options)


def answers(tokenizer, examples):
    """The decoded labelled text of each example."""
    return [tokenizer.decode([t for t in e["labels"] if t != IGNORE_INDEX]) for e in examples]


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------
# The cache


def test_a_second_preparation_reads_the_cache_and_gets_the_same_examples(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    cache = tmp_path / "cache"
    first = prepare(path, tok, cache)
    again = prepare(path, tok, cache)
    assert not first.stats.cache_hit and again.stats.cache_hit
    assert again.train == first.train and again.eval == first.eval
    assert again.stats.train_examples == first.stats.train_examples == 36 and again.stats.eval_rows == 4
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # one folder, no leftovers
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the scratch folder is gone


def test_the_cache_key_follows_data_tokenizer_template_seq_len_and_packing(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    cache = tmp_path / "cache"
    prepare(path, tok, cache)
    assert not prepare(path, tok, cache, seq_len=48).stats.cache_hit
    assert not prepare(path, tok, cache, packing=True).stats.cache_hit
    assert not prepare(path, tok, cache, seed=4).stats.cache_hit  # another eval split
    other_template = build_tokenizer("{{ 'Chat:' }}" + SMOLLM2_TEMPLATE)
    assert not prepare(path, other_template, cache).stats.cache_hit
    write_jsonl(path, qa_rows(41))  # the file changed
    changed = prepare(path, tok, cache)
    assert not changed.stats.cache_hit and changed.stats.rows_read == 41
    assert len(list(cache.iterdir())) == 6


def test_examples_are_read_by_index_from_memory_mapped_files(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(20))
    splits = prepare(path, tok, tmp_path / "cache", eval_fraction=0.0)
    train = splits.train
    assert isinstance(train, Examples) and len(train) == 20
    assert all(f.startswith(str(tmp_path / "cache")) and f.endswith(".arrow") for f in train.files())
    assert train.dataset.cache_files and train.dataset._indices is None  # on disk, no copy in memory
    import numpy

    assert train[numpy.int64(3)] == train[3] == train[-17]
    assert train[1:3] == [train[1], train[2]]
    assert answers(tok, [train[5]]) == ["Answer number 5." + EOS]
    assert collate(train[0:2], pad_id=0)["input_ids"].shape[0] == 2


def test_without_a_cache_folder_the_examples_are_still_on_disk(tok, tmp_path):
    splits = prepare(write_jsonl(tmp_path / "d.jsonl", qa_rows(12)), tok, cache=None)
    assert isinstance(splits.train, Examples) and splits.train.files() and not splits.stats.cache_hit


# ---------------------------------------------------------------------------------
# Parallel preparation


def test_parallel_preparation_gives_the_same_examples_and_names_bad_rows(tok, tmp_path, monkeypatch):
    rows = qa_rows(60)
    rows[47] = {"instruction": "No answer here."}  # line 48, in the second worker's half
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    serial = prepare(path, tok, num_proc=1, skip_bad_rows=True)
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_PROCESS", 10)
    parallel = prepare(path, tok, num_proc=2, skip_bad_rows=True)
    assert parallel.train == serial.train and parallel.eval == serial.eval
    assert parallel.stats.bad_rows == 1 and parallel.stats.bad_row_examples == ["line 48: missing field 'output'"]
    message = one_line_error(lambda: prepare(path, tok, num_proc=2))
    assert "d.jsonl: line 48: missing field 'output'" in message and "1 bad row(s)" in message


def test_bad_rows_in_a_worker_and_bad_files_fail_in_one_line(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_PROCESS", 5)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)) + "{broken\n", encoding="utf-8")
    message = one_line_error(lambda: prepare(path, tok, num_proc=2))
    assert "line 13: not valid JSON" in message
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(json.dumps(qa_rows(1)[0]).encode() + b"\n\xff\xfe\n")
    assert "not UTF-8 text (line 2" in one_line_error(lambda: prepare(binary, tok))


# ---------------------------------------------------------------------------------
# Conventions


def test_sharegpt_rows_and_system_turns(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
            ]
        },
        {
            "system": "You add numbers.",
            "conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}],
        },
        {"system": "Answer in French.", "instruction": "Say hello.", "output": "Bonjour."},
        {"system": "Terse.", "prompt": "Hi?", "completion": "Hi."},
        {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    loaded, stats = load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)), skip_bad_rows=True)
    assert [r["format"] for r in loaded] == ["sharegpt", "sharegpt", "instruction", "prompt_completion"]
    assert loaded[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert [m["role"] for m in loaded[1]["messages"]] == ["system", "user", "assistant"]
    assert loaded[2]["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert loaded[3]["messages"][0] == {"role": "system", "content": "Terse."}
    assert stats.bad_rows == 1 and "line 5: turn 1 has an unknown 'from' ('narrator'" in stats.bad_row_examples[0]


def test_a_system_turn_is_rendered_and_not_learned(tok, tmp_path):
    rows = [{"system": "Answer in French.", "instruction": "Say hello.", "output": "Bonjour."}]
    splits = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok, eval_fraction=0.0)
    text = tok.decode(splits.train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    assert answers(tok, splits.train) == ["Bonjour." + EOS]


def test_several_datasets_are_mixed_in_order_with_their_counts(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(5))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(3, start=100) + [{"text": 7}])
    splits = prepare_data(f"{a},{b}", tok, 64, False, 0.0, 0, seed=0, skip_bad_rows=True, cache_dir=tmp_path / "c")
    assert splits.stats.sources == {str(a): 5, str(b): 3} and splits.stats.rows_read == 9
    assert answers(tok, splits.train) == [f"Answer number {i}." + EOS for i in [0, 1, 2, 3, 4, 100, 101, 102]]
    assert splits.stats.bad_row_examples == ["line 4: field 'text' must be a string (got int)"]
    as_list = prepare_data([str(a), str(b)], tok, 64, False, 0.0, 0, seed=0, skip_bad_rows=True)
    assert as_list.train == splits.train
    message = one_line_error(lambda: prepare_data(f"{a},{b}", tok, 64, False, 0.0, 0, seed=0))
    assert message.startswith(f"{b}: line 4:")


def test_eval_data_is_the_held_out_set_instead_of_a_share_of_the_training_rows(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(20))
    held_out = write_jsonl(tmp_path / "eval.jsonl", qa_rows(6, start=500))
    splits = prepare(train, tok, eval_data=str(held_out), eval_fraction=0.5, eval_max_rows=4)
    assert splits.stats.train_rows == 20 and splits.stats.eval_rows == 4  # capped, none taken from training
    assert splits.stats.eval_source == str(held_out)
    assert set(answers(tok, splits.eval)) < {f"Answer number {i}." + EOS for i in range(500, 506)}


def test_eval_rows_that_repeat_training_rows_are_counted_and_said(tok, tmp_path):
    from l1ra_lite.data import load_rows, split_rows

    path = write_jsonl(tmp_path / "rows.jsonl", qa_rows(30) + qa_rows(10))  # questions 0-9 twice
    splits = prepare(path, tok, eval_fraction=0.25, eval_max_rows=10)
    train, held_out = split_rows(load_rows(str(path))[0], 0.25, 10, seed=3)
    in_training = [r for r in held_out if r["messages"] in [t["messages"] for t in train]]
    assert splits.stats.eval_rows_in_training == len(in_training) > 0
    assert f"{len(in_training)} of 10 eval rows also occur in the training rows" in splits.stats.notes()[0]
    held_out = write_jsonl(tmp_path / "eval.jsonl", qa_rows(3, start=8) + qa_rows(3, start=500))
    separate = prepare(write_jsonl(tmp_path / "train.jsonl", qa_rows(20)), tok, eval_data=str(held_out))
    assert separate.stats.eval_rows_in_training == 3  # questions 8, 9 and 10 are in both files
    assert prepare(write_jsonl(tmp_path / "distinct.jsonl", qa_rows(30)), tok).stats.notes() == []
    bad = write_jsonl(tmp_path / "bad.jsonl", qa_rows(30) + [{"question": "no answer field"}])
    assert prepare(bad, tok, skip_bad_rows=True).stats.notes()[0].startswith("1 bad row(s) skipped, e.g. ")


def write_dataset_folder(root):
    """A local folder laid out like a hub dataset: two subsets, splits by file."""
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    write_jsonl(root / "alpha" / "train.jsonl", qa_rows(8))
    write_jsonl(root / "alpha" / "test.jsonl", qa_rows(3, start=50))
    write_jsonl(root / "beta" / "train.jsonl", qa_rows(5, start=200))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: alpha\n  data_files:\n  - split: train\n    path: alpha/train.jsonl\n"
        "  - split: test\n    path: alpha/test.jsonl\n"
        "- config_name: beta\n  data_files:\n  - split: train\n    path: beta/train.jsonl\n---\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_a_dataset_folder_with_subsets_and_splits(tok, tmp_path, hf_cache):
    folder = str(write_dataset_folder(tmp_path / "org-data"))
    beta = prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, subset="beta", cache_dir=tmp_path / "c")
    assert answers(tok, beta.train) == [f"Answer number {i}." + EOS for i in range(200, 205)]
    alpha = prepare_data(folder, tok, 64, False, 0.0, 10, seed=0, subset="alpha", eval_data=folder, eval_split="test")
    assert alpha.stats.train_rows == 8 and alpha.stats.eval_rows == 3
    test_only = prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, subset="alpha", split="test")
    assert answers(tok, test_only.train) == [f"Answer number {i}." + EOS for i in range(50, 53)]
    message = one_line_error(lambda: prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, subset="gamma"))
    assert "cannot load dataset" in message and "'gamma'" in message


def test_data_files_pick_files_inside_a_dataset_folder(tok, tmp_path, hf_cache):
    folder = str(write_dataset_folder(tmp_path / "org-data"))
    beta = prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, data_files="beta/*.jsonl", cache_dir=tmp_path / "c")
    assert answers(tok, beta.train) == [f"Answer number {i}." + EOS for i in range(200, 205)]
    both = prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, data_files="*/train.jsonl", cache_dir=tmp_path / "c")
    assert both.stats.train_rows == 8 + 5  # another file set: another cache entry, not beta's
    message = one_line_error(lambda: prepare_data(folder, tok, 64, False, 0.0, 0, seed=0, data_files="nope/*.jsonl"))
    assert "cannot load dataset" in message and "files 'nope/*.jsonl'" in message
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, qa_rows(3))
    message = one_line_error(lambda: prepare_data(str(rows), tok, 64, False, 0.0, 0, seed=0, data_files="x"))
    assert "--data-files picks files inside a hub dataset or a dataset folder" in message


def test_chat_template_by_file_or_name(tmp_path):
    tokenizer = build_tokenizer()
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}", encoding="utf-8"
    )
    use_chat_template(tokenizer, str(template))
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
    use_chat_template(tokenizer, "chatml")
    assert "<|im_start|>" in tokenizer.chat_template
    tokenizer.chat_template = {"default": SMOLLM2_TEMPLATE, "terse": "{{ messages[-1]['content'] }}"}
    use_chat_template(tokenizer, "terse")
    assert tokenizer.chat_template == "{{ messages[-1]['content'] }}"
    assert "unknown chat template 'nope'" in one_line_error(lambda: use_chat_template(tokenizer, "nope"))
    assert "not found" in one_line_error(lambda: use_chat_template(tokenizer, "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for %}", encoding="utf-8")
    assert "does not render" in one_line_error(lambda: use_chat_template(tokenizer, str(broken)))


# ---------------------------------------------------------------------------------
# Packing without cross-example attention


def tiny_model(architecture: str, attention: str):
    """A tiny random llama / mistral / qwen2 (the same sizes as tests.tiny's llama)."""
    import transformers

    from tests.tiny import tiny_llama_config

    sizes = {k: v for k, v in tiny_llama_config().to_dict().items() if k in _SIZE_KEYS}
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    torch.manual_seed(1)
    return model_class(config_class(**sizes, attn_implementation=attention)).float().eval()


_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)


@pytest.mark.parametrize(
    "architecture, attention",
    [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa")],
)
def test_a_packed_batch_gives_the_same_loss_as_its_examples_one_by_one(architecture, attention):
    from l1ra_lite.loss import causal_lm_loss

    model = tiny_model(architecture, attention)
    g = torch.Generator().manual_seed(0)
    eos = 2
    examples = []
    for n in (9, 14, 5, 20, 7):  # 60 tokens with the separators: less than one chunk of 64
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        examples.append({"input_ids": ids, "labels": labels})
    chunks, tail = pack(examples, 64, eos)
    assert len(chunks) == 1 and tail == 0
    packed = collate(chunks, pad_id=0)
    assert "position_ids" in packed
    # one by one: each example as it sits in the chunk (with its separator), alone
    pieces = []
    positions = chunks[0]["position_ids"]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    for lo, hi in zip(starts, starts[1:]):
        pieces.append({"input_ids": chunks[0]["input_ids"][lo:hi], "labels": chunks[0]["labels"][lo:hi]})
    assert len(pieces) == 5
    with torch.no_grad():
        packed_loss = causal_lm_loss(model, packed).item()
        total, count = 0.0, 0
        for piece in pieces:
            batch = collate([piece], pad_id=0)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += causal_lm_loss(model, batch).item() * n
            count += n
        # the same examples concatenated without position ids do see each other
        leaky = causal_lm_loss(model, {k: v for k, v in packed.items() if k != "position_ids"}).item()
    assert abs(packed_loss - total / count) < 1e-5
    assert abs(leaky - total / count) > 1e-4


def test_packed_chunks_in_the_pipeline_carry_positions_that_restart_per_example(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(30))
    splits = prepare(path, tok, tmp_path / "c", packing=True, eval_fraction=0.0)
    plain = prepare(path, tok, tmp_path / "c", eval_fraction=0.0)
    chunk = splits.train[1]
    assert len(chunk["input_ids"]) == len(chunk["position_ids"]) == 64
    starts = [i for i, p in enumerate(chunk["position_ids"]) if p == 0]
    assert starts and all(
        chunk["position_ids"][i] == chunk["position_ids"][i - 1] + 1 for i in range(1, 64) if i not in starts
    )
    # every example but a carried-over piece starts with the chat's first token, never learned
    first_token = plain.train[0]["input_ids"][0]
    assert all(chunk["input_ids"][i] == first_token and chunk["labels"][i] == IGNORE_INDEX for i in starts[1:])
    assert splits.stats.packed and splits.stats.train_examples == len(splits.train)


# ---------------------------------------------------------------------------------
# Training on the pipeline: exact resume after a cache hit, with packing; the command line


def packed_config(workdir, cache, **overrides):
    from l1ra_lite.config import FinetuneConfig

    values = dict(
        model=str(workdir / "base"),
        data=str(workdir / "data.jsonl"),
        quant="none",
        budget=28,
        max_steps=8,
        batch_size=2,
        grad_accum=2,
        seq_len=48,
        packing=True,
        lr=5e-3,
        warmup=2,
        update_every=3,
        l1_lambda=6.0,
        eta_c=0.05,
        eval_every=4,
        save_every=4,
        seed=7,
        plain=True,
        data_cache=str(cache),
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def test_a_packed_run_resumed_from_the_cache_ends_as_the_uninterrupted_one(workdir, tmp_path):
    from safetensors.torch import load_file

    from l1ra_lite.train import Interrupted, train

    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    straight.mkdir()
    train(packed_config(workdir, cache), straight, lambda e: None, device="cpu")  # prepares: a cache miss
    stats = json.loads((straight / "config.json").read_text())["data_stats"]
    assert stats["packed"] and not stats["cache_hit"] and stats["train_examples"] < 48
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    calls = {"n": 0}

    def stop_at_3():
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(Interrupted):
        train(packed_config(workdir, cache), resumed, lambda e: None, should_stop=stop_at_3, device="cpu")
    assert json.loads((resumed / "config.json").read_text())["data_stats"]["cache_hit"]
    train(packed_config(workdir, cache), resumed, lambda e: None, resume=True, device="cpu")
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (straight, resumed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def cli(capsys, *args):
    from l1ra_lite.cli import main

    code = main(["finetune", *map(str, args)])
    return code, capsys.readouterr()


def test_the_help_shows_every_data_option(capsys):
    with pytest.raises(SystemExit):
        cli(capsys, "--help")
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--data",
        "--data-subset",
        "--data-files",
        "--data-split",
        "--eval-data",
        "--eval-split",
        "--chat-template",
        "--num-proc",
        "--data-cache",
        "--packing",
        "--skip-bad-rows",
        "--streaming",
    ):
        assert option in text, option
    assert "ShareGPT" in text and "position ids restart per example" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--chat-template", "nope"], "unknown chat template 'nope'"),
        (["--data-subset", "x"], "cannot load dataset"),
        (["--eval-data", "missing.jsonl"], "data file not found: missing.jsonl"),
        (["--num-proc", "0"], "num-proc must be at least 1"),
    ],
)
def test_bad_data_options_get_one_clear_line(workdir, capsys, tmp_path, hf_cache, args, message):
    data = tmp_path / "folder"  # --data-subset needs a dataset folder (or hub id)
    write_dataset_folder(data) if "--data-subset" in args else None
    source = data if "--data-subset" in args else workdir / "data.jsonl"
    common = ["--model", workdir / "base", "--data", source, "--quant", "none", "--max-steps", 1, "--plain"]
    code, captured = cli(capsys, *common, "--data-cache", tmp_path / "c", "--output", tmp_path / "out", *args)
    lines = captured.err.strip().splitlines()
    assert code == 2 and message in lines[-1] and "Traceback" not in captured.err


def test_repeated_data_flags_mix_the_files(workdir, capsys, tmp_path):
    second = write_jsonl(tmp_path / "more.jsonl", qa_rows(6))
    out = tmp_path / "out"
    common = ["--model", workdir / "base", "--quant", "none", "--max-steps", 1, "--plain", "--budget", 14]
    code, _ = cli(
        capsys,
        *common,
        "--data",
        workdir / "data.jsonl",
        "--data",
        second,
        "--data-cache",
        tmp_path / "c",
        "--output",
        out,
    )
    config = json.loads((out / "config.json").read_text())
    assert code == 0 and config["data"] == f"{workdir / 'data.jsonl'},{second}"
    assert config["data_stats"]["sources"] == {str(workdir / "data.jsonl"): 48, str(second): 6}


# ---------------------------------------------------------------------------------
# Streaming


def test_a_stream_is_seeded_replayable_and_runs_past_its_end(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    options = dict(max_steps=5, examples_per_step=4)
    splits = prepare_data(str(path), tok, 64, False, 0.0, 3, seed=1, streaming=True, **options)
    stream = splits.train
    first = stream.take(0, 30)  # 27 rows for training (3 held out): past the end, into a reshuffled second pass
    trained = set(answers(tok, first))
    held_out = answers(tok, splits.eval)
    assert held_out == [f"Answer number {i}." + EOS for i in range(3)]  # the stream's first rows
    assert trained == {f"Answer number {i}." + EOS for i in range(3, 12)}  # every other row, none held out
    assert answers(tok, first[:9]) != [f"Answer number {i}." + EOS for i in range(3, 12)]  # shuffled
    again = prepare_data(str(path), tok, 64, False, 0.0, 3, seed=1, streaming=True, **options).train
    assert again.take(10, 5) == first[10:15]  # a fresh stream skips to the position: exact resume
    assert again.take(2, 3) == first[2:5]  # and going back replays it
    assert len(stream) == 20  # the nominal size the schedule is planned with


def test_streaming_needs_max_steps_and_packs_like_the_prepared_path(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(30))
    message = one_line_error(lambda: prepare_data(str(path), tok, 64, True, 0.0, 0, seed=0, streaming=True))
    assert "--streaming needs --max-steps" in message
    stream = prepare_data(str(path), tok, 64, True, 0.0, 0, seed=0, streaming=True, max_steps=2).train
    chunks = stream.take(0, 10)
    assert all(len(c["input_ids"]) == len(c["position_ids"]) == 64 for c in chunks)
    assert sum(c["position_ids"].count(0) for c in chunks) > 10


def test_a_streamed_run_resumes_exactly(workdir, tmp_path):
    from safetensors.torch import load_file

    from l1ra_lite.train import Interrupted, train

    common = dict(streaming=True, packing=False, eval_max_rows=4)
    straight = tmp_path / "straight"
    straight.mkdir()
    train(packed_config(workdir, tmp_path / "c", **common), straight, lambda e: None, device="cpu")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    calls = {"n": 0}

    def stop_at_5():
        calls["n"] += 1
        return calls["n"] >= 5

    with pytest.raises(Interrupted):
        train(
            packed_config(workdir, tmp_path / "c", **common),
            resumed,
            lambda e: None,
            should_stop=stop_at_5,
            device="cpu",
        )
    train(packed_config(workdir, tmp_path / "c", **common), resumed, lambda e: None, resume=True, device="cpu")
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
