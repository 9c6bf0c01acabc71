"""Tests for l1ra_lite.data: reading rows, answer-only labels, seq_len fitting, splits, batches."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch

from l1ra_lite import data
from l1ra_lite.data import (
    IGNORE_INDEX,
    collate,
    encode_rows,
    epoch_order,
    eval_row_count,
    load_rows,
    pack,
    prepare_data,
    split_rows,
    truncate,
)
from l1ra_lite.errors import UserError
from tests.tiny import EOS, SMOLLM2_TEMPLATE, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def labelled_runs(tokenizer, example):
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


INSTRUCTION_ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "hello", "output": "bonjour"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


# ---------------------------------------------------------------------------------
# Reading files


def write_all_formats(tmp_path, rows):
    columns = list(rows[0])
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "json-data": tmp_path / "wrapped.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(rows), encoding="utf-8")
    paths["json-data"].write_text(json.dumps({"data": rows}), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_every_file_format_gives_the_same_rows(tmp_path):
    paths = write_all_formats(tmp_path, INSTRUCTION_ROWS)
    expected = [
        [{"role": "user", "content": "Name the capital of France."}, {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "Translate to French.\n\nhello"}, {"role": "assistant", "content": "bonjour"}],
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
    ]
    for kind, path in paths.items():
        rows, stats = load_rows(str(path))
        assert [row["messages"] for row in rows] == expected, kind
        assert stats.rows_read == 3 and stats.bad_rows == 0 and stats.format == "instruction", kind
        unit = "line" if kind == "jsonl" else "row"
        assert [row["where"] for row in rows] == [f"{unit} 1", f"{unit} 2", f"{unit} 3"], kind


def test_chat_rows_round_trip_through_parquet_and_csv(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    parquet_rows, _ = load_rows(str(write_all_formats(tmp_path, rows)["parquet"]))
    assert parquet_rows[0]["messages"] == rows[0]["messages"]
    # in a CSV the chat column is JSON text
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"' + json.dumps(rows[0]["messages"]).replace('"', '""') + '"\n', encoding="utf-8")
    csv_rows, stats = load_rows(str(path))
    assert csv_rows[0]["messages"] == rows[0]["messages"] and stats.format == "chat"


def test_json_file_with_one_object_per_line_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"text": "a b"}, {"text": "c d"}])
    rows, _ = load_rows(str(path))
    assert [row["text"] for row in rows] == ["a b", "c d"]
    assert rows[1]["where"] == "line 2"


# ---------------------------------------------------------------------------------
# Format detection


def test_format_detected_for_each_row_kind(tmp_path):
    source = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "unanswered"},
            ]
        },
        {"instruction": "Say yes.", "output": "Yes."},
        {"prompt": "Two plus two?", "completion": "Four."},
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
        {"text": "Just some text."},
    ]
    rows, stats = load_rows(str(write_jsonl(tmp_path / "mixed.jsonl", source)))
    assert [row["format"] for row in rows] == ["chat", "instruction", "prompt_completion", "prompt_completion", "text"]
    assert stats.formats == {"chat": 1, "instruction": 1, "prompt_completion": 2, "text": 1}
    assert stats.format == "mixed"
    # the trailing unanswered user turn is dropped: it would carry no loss
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[1]["messages"] == [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]
    assert rows[2]["messages"][1] == {"role": "assistant", "content": "Four."}
    assert rows[3]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert rows[4] == {"format": "text", "text": "Just some text.", "where": "line 5"}


# ---------------------------------------------------------------------------------
# Answer-only labels


def test_labels_cover_exactly_the_assistant_answers(tok):
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, today."},
    ]
    (example,), problems = encode_rows([{"format": "chat", "messages": messages}], tok)
    assert problems == []
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # each answer and its end-of-turn token; the template's line break after it is not learned
    assert labelled_runs(tok, example) == ["The capital of France is Paris." + EOS, "Rome, today." + EOS]


def test_instruction_and_prompt_completion_rows_learn_only_the_answer(tok):
    rows = [
        {
            "format": "instruction",
            "messages": [
                {"role": "user", "content": "Translate.\n\nhello"},
                {"role": "assistant", "content": "bonjour"},
            ],
        },
        {
            "format": "prompt_completion",
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " Four"}],
        },
    ]
    examples, _ = encode_rows(rows, tok)
    assert labelled_runs(tok, examples[0]) == ["bonjour" + EOS]
    assert labelled_runs(tok, examples[1]) == [" Four" + EOS]


def test_plain_text_learns_every_token_and_ends_with_eos(tok):
    (example,), _ = encode_rows([{"format": "text", "text": "hello world"}], tok)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(example["input_ids"]) == "hello world" + EOS


def test_examples_stay_in_row_order_across_formats(tok):
    rows = [
        {"format": "text", "text": "first"},
        {"format": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "second"}]},
        {"format": "text", "text": "third"},
    ]
    examples, _ = encode_rows(rows, tok)
    assert [labelled_runs(tok, e)[0] for e in examples] == ["first" + EOS, "second" + EOS, "third" + EOS]


def test_template_that_rewrites_earlier_turns_still_masks_the_answer():
    # This template writes the number of messages first, so a conversation's prefixes
    # do not line up with it: the answer is then found in the text itself.
    template = "{{ messages|length }}\n" + SMOLLM2_TEMPLATE
    tokenizer = build_tokenizer(template)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello again"},
    ]
    (example,), _ = encode_rows([{"format": "chat", "messages": messages}], tokenizer)
    assert labelled_runs(tokenizer, example) == ["hello world" + EOS, "hello again" + EOS]


def test_tokenizer_without_offsets_gives_the_same_labels(tok):
    class NoOffsets(type(tok)):
        is_fast = False  # take the piece-by-piece path

    slow = NoOffsets(tokenizer_object=tok.backend_tokenizer, eos_token=EOS, pad_token="<|endoftext|>")
    slow.chat_template = SMOLLM2_TEMPLATE
    row = {
        "format": "chat",
        "messages": [
            {"role": "user", "content": "What is the capital?"},
            {"role": "assistant", "content": "Paris, of course."},
        ],
    }
    assert encode_rows([row], slow)[0] == encode_rows([row], tok)[0]


def test_template_errors_are_bad_rows_with_their_position(tmp_path):
    refuse_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    template = refuse_system + SMOLLM2_TEMPLATE
    tokenizer = build_tokenizer(template)
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"text": "the capital"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"line 2: the chat template rejected it \(no system turns\)"):
        prepare_data(str(path), tokenizer, 256, False, 0.0, 0, seed=0)
    splits = prepare_data(str(path), tokenizer, 256, False, 0.0, 0, seed=0, skip_bad_rows=True)
    assert splits.stats.bad_rows == 1 and len(splits.train) == 2


def test_chat_rows_need_a_chat_template(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCTION_ROWS)
    with pytest.raises(UserError, match="no chat template"):
        prepare_data(str(path), tokenizer, 64, False, 0.0, 0, seed=0)


# ---------------------------------------------------------------------------------
# Beginning of sequence (BOS)

BOS = "<|begin_of_text|>"
LLAMA3_STYLE_TEMPLATE = "{{ bos_token }}" + SMOLLM2_TEMPLATE  # a template that writes BOS itself
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, today."},
]
EVERY_ROW_KIND = [
    {"format": "chat", "messages": CONVERSATION},
    {
        "format": "instruction",
        "messages": [{"role": "user", "content": "Translate.\n\nhello"}, {"role": "assistant", "content": "bonjour"}],
    },
    {
        "format": "prompt_completion",
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " Four"}],
    },
    {"format": "text", "text": "hello world"},
]
ANSWERS = [
    ["The capital of France is Paris." + EOS, "Rome, today." + EOS],
    ["bonjour" + EOS],
    [" Four" + EOS],
    ["hello world" + EOS],
]


def build_bos_tokenizer(template=None):
    """Like Llama 3.1 base: a tokenizer that puts BOS in front of every text it encodes."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer().backend_tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token="<|endoftext|>",
        add_bos_token=True,
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    """A BOS-adding base model tokenizer without a chat template, loaded the way
    finetune loads it (so it gets the fallback template, models.DEFAULT_CHAT_TEMPLATE)."""
    from l1ra_lite.models import ModelSource, load_tokenizer

    folder = tmp_path_factory.mktemp("base-tokenizer")
    build_bos_tokenizer().save_pretrained(folder)
    tokenizer = load_tokenizer(ModelSource(name="base", path=str(folder)))
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the premise: it adds BOS
    return tokenizer


def rendered(tokenizer, row):
    if row["format"] == "text":
        return row["text"]
    return tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_every_row_kind_starts_with_one_unlearned_bos_when_the_tokenizer_adds_one(base_tok):
    bos = base_tok.bos_token_id
    examples, problems = encode_rows(EVERY_ROW_KIND, base_tok)
    assert problems == [] and len(examples) == 4
    for row, example, answers in zip(EVERY_ROW_KIND, examples, ANSWERS):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == bos and ids.count(bos) == 1, row["format"]
        assert labels[0] == IGNORE_INDEX and bos not in labels
        # exactly what the tokenizer makes of the text with its own special tokens (plus
        # the document's EOS for plain text); a BOS the template may write is not doubled
        text = rendered(base_tok, row)
        text = text[len(BOS) :] if text.startswith(BOS) else text
        expected = base_tok(text)["input_ids"]
        assert ids == expected + ([base_tok.eos_token_id] if row["format"] == "text" else [])
        assert labelled_runs(base_tok, example) == answers


def test_template_that_writes_bos_gets_no_second_one():
    # Llama 3 instruct: the tokenizer adds BOS and the template writes bos_token too.
    tokenizer = build_bos_tokenizer(LLAMA3_STYLE_TEMPLATE)
    (example,), _ = encode_rows([{"format": "chat", "messages": CONVERSATION}], tokenizer)
    assert tokenizer.convert_ids_to_tokens(example["input_ids"][:2]) == [BOS, "<|im_start|>"]
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1 and example["labels"][0] == IGNORE_INDEX
    assert labelled_runs(tokenizer, example) == ANSWERS[0]


def build_gpt2_style_tokenizer():
    """Like GPT-2 or SmolLM2 base: a bos_token (<|endoftext|>) that the tokenizer never adds."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer().backend_tokenizer,
        bos_token="<|endoftext|>",
        eos_token=EOS,
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("make", [build_tokenizer, build_gpt2_style_tokenizer], ids=["smollm2-style", "gpt2-style"])
def test_tokenizer_that_adds_no_bos_gets_none(make):
    # Both have a bos_token (<|im_start|> as SmolLM2's; <|endoftext|>) but never prepend it.
    tokenizer = make()
    assert data.leading_bos_id(tokenizer) is None
    examples, _ = encode_rows(EVERY_ROW_KIND, tokenizer)
    for row, example, answers in zip(EVERY_ROW_KIND, examples, ANSWERS):
        text_ids = tokenizer(rendered(tokenizer, row), add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == text_ids + ([tokenizer.eos_token_id] if row["format"] == "text" else [])
        assert labelled_runs(tokenizer, example) == answers
    assert examples[-1]["labels"] == examples[-1]["input_ids"]  # plain text: every token learned


def test_smollm2_tokenizer_gets_no_bos():
    # The embedded default's own tokenizer and template: unchanged by the BOS rule.
    from transformers import AutoTokenizer

    from l1ra_lite.models import embedded_gguf_path

    gguf_file = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert data.leading_bos_id(tokenizer) is None
    (example,), _ = encode_rows([{"format": "chat", "messages": CONVERSATION}], tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(example["input_ids"][:2]) == ["<|im_start|>", "system"]


def test_bos_is_the_same_without_character_offsets(base_tok):
    class NoOffsets(type(base_tok)):
        is_fast = False  # take the piece-by-piece path

    slow = NoOffsets(
        tokenizer_object=base_tok.backend_tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token="<|endoftext|>",
        add_bos_token=True,
    )
    slow.chat_template = base_tok.chat_template
    examples, _ = encode_rows(EVERY_ROW_KIND, slow)
    assert examples == encode_rows(EVERY_ROW_KIND, base_tok)[0]
    assert examples[0]["input_ids"][0] == base_tok.bos_token_id


def test_packed_stream_keeps_one_unlearned_bos_per_example(base_tok, tmp_path):
    rows = [
        {"text": f"hello world {i}"} if i % 4 == 1 else {"instruction": f"Question {i}?", "output": f"Answer {i}."}
        for i in range(16)
    ]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    plain = prepare_data(path, base_tok, 64, False, 0.0, 0, seed=0)
    packed = prepare_data(path, base_tok, 64, True, 0.0, 0, seed=0)
    bos, eos = base_tok.bos_token_id, base_tok.eos_token_id
    stream, starts = [], []
    for example in plain.train:
        starts.append(len(stream))
        stream += example["input_ids"]
        if stream[-1] != eos:
            stream.append(eos)
    ids = [t for c in packed.train for t in c["input_ids"]]
    labels = [t for c in packed.train for t in c["labels"]]
    assert ids == stream[: len(ids)] and len(packed.train) == 4
    # each example (plain text ones too) begins with its BOS, right after the EOS that
    # ends the one before, and no BOS is learned
    in_chunks = [i for i in starts if i < len(ids)]
    assert [i for i, t in enumerate(ids) if t == bos] == in_chunks and len(in_chunks) >= 12
    assert all(ids[i - 1] == eos for i in in_chunks[1:])
    assert bos not in labels and all(labels[i] == IGNORE_INDEX for i in in_chunks)


def test_training_and_the_gguf_export_agree_on_bos(base_tok, tmp_path):
    """What llama.cpp feeds a model exported by `export --format gguf` for a conversation
    is what training fed it: llama.cpp renders the chat template, drops a leading BOS the
    template wrote when the file says add_bos_token, then tokenises with BOS if add_bos."""
    import gguf

    from l1ra_lite.export.gguf_vocab import add_vocab

    cases = {
        "adds BOS, fallback template": base_tok,
        "adds BOS, template writes it": build_bos_tokenizer(LLAMA3_STYLE_TEMPLATE),
        "no BOS": build_gpt2_style_tokenizer(),
    }
    for name, tokenizer in cases.items():
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        tokenizer.save_pretrained(folder)
        path = folder / "vocab.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        add_vocab(writer, folder, len(tokenizer))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        fields = gguf.GGUFReader(path).fields
        add_bos = bool(fields["tokenizer.ggml.add_bos_token"].contents())
        assert add_bos == (name != "no BOS"), name
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        if add_bos and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token) :]
        bos_id = fields["tokenizer.ggml.bos_token_id"].contents()
        inference = [bos_id] * add_bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        (example,), _ = encode_rows([{"format": "chat", "messages": CONVERSATION}], tokenizer)
        assert example["input_ids"] == inference, name


# ---------------------------------------------------------------------------------
# Truncation and packing


def test_truncation_cuts_to_seq_len_and_drops_examples_without_an_answer(tok, tmp_path):
    long_answer = "The capital of France is Paris. " * 20
    rows = [
        {"instruction": "Talk.", "output": long_answer},  # answer starts early: cut, kept
        {"instruction": "hello world " * 40, "output": "Paris."},  # answer beyond seq_len: dropped
        {"instruction": "Hi.", "output": "Hello."},  # short: untouched
    ]
    splits = prepare_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 48, False, 0.0, 0, seed=0)
    assert splits.stats.truncated == 2 and splits.stats.dropped == 1
    assert len(splits.train) == 2
    assert len(splits.train[0]["input_ids"]) == 48 == len(splits.train[0]["labels"])
    assert len(splits.train[1]["input_ids"]) < 48
    assert labelled_runs(tok, splits.train[1]) == ["Hello." + EOS]
    assert splits.stats.train_tokens == 48 + len(splits.train[1]["input_ids"])


def test_truncate_counts():
    examples = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [1, 2], "labels": [1, -100]},  # only labels[0]: nothing the loss can use
    ]
    kept, cut, dropped = truncate(examples, 3)
    assert kept == [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    assert (cut, dropped) == (1, 2)


def test_pack_makes_full_chunks_and_carries_labels():
    eos = 99
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5, 99], "labels": [-100, 5, 99]},  # already ends with EOS: no separator
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
    ]
    chunks, tail = pack(examples, 4, eos)
    stream_ids = [1, 2, 3, 99, 4, 5, 99, 6, 7, 8, 9, 99]
    # each example's first token is never learned packed: only another example precedes it
    stream_labels = [-100, 2, 3, -100, -100, 5, 99, -100, 7, 8, 9, -100]
    assert [c["input_ids"] for c in chunks] == [stream_ids[0:4], stream_ids[4:8], stream_ids[8:12]]
    assert [c["labels"] for c in chunks] == [stream_labels[0:4], stream_labels[4:8], stream_labels[8:12]]
    # positions restart where each example starts, and where a chunk starts mid-example
    assert [c["position_ids"] for c in chunks] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert tail == 0
    chunks, tail = pack(examples, 5, eos)
    assert [len(c["input_ids"]) for c in chunks] == [5, 5] and tail == 2
    # too little data for one chunk: the one shorter chunk, not nothing
    chunks, tail = pack(examples[:1], 10, eos)
    assert chunks == [{"input_ids": [1, 2, 3, 99], "labels": [-100, 2, 3, -100], "position_ids": [0, 1, 2, 3]}]
    assert tail == 0


def test_prepare_data_with_packing(tok, tmp_path):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(30)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    plain = prepare_data(path, tok, 64, False, 0.1, 10, seed=3)
    packed = prepare_data(path, tok, 64, True, 0.1, 10, seed=3)
    assert packed.stats.packed and all(len(c["input_ids"]) == 64 == len(c["labels"]) for c in packed.train)
    stream = [token for e in plain.train for token in e["input_ids"] + [tok.eos_token_id]]
    assert [t for c in packed.train for t in c["input_ids"]] == stream[: 64 * len(packed.train)]
    assert packed.stats.pack_tail_tokens == len(stream) - 64 * len(packed.train)
    learned = [t for c in packed.train for t in c["labels"] if t != IGNORE_INDEX]
    expected = [t for e in plain.train for t in e["labels"] if t != IGNORE_INDEX]
    assert learned == expected[: len(learned)] and len(learned) > 0.9 * len(expected)
    # eval rows are the same rows, not packed
    assert packed.eval == plain.eval and len(packed.eval) == 3


# ---------------------------------------------------------------------------------
# Eval split


def test_eval_row_count_fraction_cap_and_minimum():
    assert eval_row_count(1000, 0.05, 200) == 50
    assert eval_row_count(10000, 0.05, 200) == 200
    assert eval_row_count(5, 0.05, 200) == 1  # at least one when asked for
    assert eval_row_count(2, 0.9, 200) == 1  # never every row
    assert eval_row_count(1, 0.5, 200) == 0
    assert eval_row_count(1000, 0.0, 200) == 0
    assert eval_row_count(1000, 0.05, 0) == 0


def test_split_rows_is_seeded_and_disjoint():
    rows = list(range(100))
    train, held_out = split_rows(rows, 0.1, 200, seed=7)
    assert len(held_out) == 10 and len(train) == 90
    assert sorted(train + held_out) == rows and train == sorted(train)
    torch.manual_seed(123)
    np.random.seed(123)  # the global RNGs do not matter
    assert split_rows(rows, 0.1, 200, seed=7) == (train, held_out)
    assert split_rows(rows, 0.1, 200, seed=8)[1] != held_out
    assert len(split_rows(rows, 0.5, 4, seed=7)[1]) == 4  # the cap


def test_prepare_data_split_matches_rows(tok, tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    first = prepare_data(path, tok, 64, False, 0.25, 100, seed=1)
    again = prepare_data(path, tok, 64, False, 0.25, 100, seed=1)
    other = prepare_data(path, tok, 64, False, 0.25, 100, seed=2)
    assert first.eval == again.eval and first.train == again.train
    assert first.eval != other.eval
    assert (first.stats.train_rows, first.stats.eval_rows) == (15, 5)
    eval_answers = {labelled_runs(tok, e)[0] for e in first.eval}
    train_answers = {labelled_runs(tok, e)[0] for e in first.train}
    assert not eval_answers & train_answers and len(eval_answers | train_answers) == 20


# ---------------------------------------------------------------------------------
# Batches


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    order = epoch_order(50, seed=42, epoch=0)
    assert sorted(order) == list(range(50))
    torch.manual_seed(0)
    np.random.seed(0)
    assert epoch_order(50, seed=42, epoch=0) == order
    assert epoch_order(50, seed=42, epoch=1) != order
    assert epoch_order(50, seed=43, epoch=0) != order
    assert epoch_order(0, seed=42, epoch=0) == []


def test_collate_pads_to_the_longest():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---------------------------------------------------------------------------------
# Bad rows and bad files


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_jsonl_rows_named_by_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": "fine"}),  # line 1
                "",  # line 2, blank: ignored
                json.dumps({"question": "?", "answer": "!"}),  # line 3: no recognised fields
                "{not json",  # line 4
                json.dumps(["a list"]),  # line 5: not an object
                json.dumps({"instruction": "Do it.", "output": "  "}),  # line 6: empty answer
                json.dumps({"messages": "hi"}),  # line 7: wrong type
                json.dumps({"prompt": "p", "completion": "c"}),  # line 8
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    message = one_line_error(lambda: load_rows(str(path)))
    assert "line 3: no recognised fields (found: question, answer)" in message
    assert "5 bad row(s)" in message and "instruction, output" in message and "--skip-bad-rows" in message
    rows, stats = load_rows(str(path), skip_bad_rows=True)
    assert [row["where"] for row in rows] == ["line 1", "line 8"]
    assert stats.rows_read == 7 and stats.bad_rows == 5
    assert [p.split(":")[0] for p in stats.bad_row_examples] == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "not valid JSON" in stats.bad_row_examples[1]
    assert "not an object" in stats.bad_row_examples[2]
    assert "'output' is empty" in stats.bad_row_examples[3]
    assert "'messages' must be a list" in stats.bad_row_examples[4]


def test_bad_rows_in_csv_and_json_named_by_row_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nSay hi.,hi\nSay bye.\n", encoding="utf-8")
    assert "row 2: field 'output' must be a string" in one_line_error(lambda: load_rows(str(path)))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "ok"}, {"text": 3}, {"messages": [{"role": "user", "content": "q"}]}]))
    message = one_line_error(lambda: load_rows(str(path)))
    assert "row 2: field 'text' must be a string (got int)" in message and "2 bad row(s)" in message
    _, stats = load_rows(str(path), skip_bad_rows=True)
    assert stats.bad_rows == 2 and "row 3: no assistant message" in stats.bad_row_examples[1]


def test_bad_files_give_one_line_errors(tmp_path):
    assert "data file not found" in one_line_error(lambda: load_rows(str(tmp_path / "missing.jsonl")))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"text": "a"},\n {"text": ]', encoding="utf-8")
    assert "is not valid JSON: Expecting value at line 2, column 11" in one_line_error(lambda: load_rows(str(bad_json)))
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text('{"text": "a"}', encoding="utf-8")
    assert "list of objects" in one_line_error(lambda: load_rows(str(not_a_list)))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8" in one_line_error(lambda: load_rows(str(binary)))
    broken_parquet = tmp_path / "x.parquet"
    broken_parquet.write_bytes(b"not parquet at all")
    assert "as Parquet" in one_line_error(lambda: load_rows(str(broken_parquet)))
    odd = tmp_path / "d.xml"
    odd.write_text("<x/>")
    assert "unknown data file type" in one_line_error(lambda: load_rows(str(odd)))
    # a folder is read like a hub dataset; one laid out like none fails in one line
    assert "cannot load dataset" in one_line_error(lambda: load_rows(str(tmp_path)))


def test_no_usable_rows_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert "no usable rows" in one_line_error(lambda: load_rows(str(empty)))
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert "no usable rows (read 1)" in one_line_error(lambda: load_rows(str(all_bad), skip_bad_rows=True))


# ---------------------------------------------------------------------------------
# Hub datasets


def test_hub_dataset_failure_names_the_source(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = one_line_error(lambda: load_rows("someorg/somedata"))
    assert "cannot load dataset 'someorg/somedata'" in message and "ConnectionError" in message


def test_hub_dataset_rows_are_read(monkeypatch):
    import datasets

    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows, stats = load_rows("someorg/somedata")
    assert calls == [("someorg/somedata", "train")]
    assert [(r["text"], r["where"]) for r in rows] == [("one", "row 1"), ("two", "row 2")]
    assert stats.source == "someorg/somedata"


# ---------------------------------------------------------------------------------
# The embedded default


def test_embedded_corpus_loads_its_conversations():
    rows, stats = load_rows(None)
    assert 2000 <= len(rows) <= 2030 and stats.format == "chat"
    assert stats.rows_read == 2026 and stats.bad_rows == 1  # trivia.yml has one malformed entry
    assert all(row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant" for row in rows)
    assert all(
        row["messages"][i]["role"] == ("user", "assistant")[i % 2] for row in rows for i in range(len(row["messages"]))
    )
    first = rows[0]
    assert first["where"] == "ai.yml conversation 1"
    assert first["messages"] == [
        {"role": "user", "content": "What is AI?"},
        {
            "role": "assistant",
            "content": "Artificial Intelligence is the branch of engineering and science "
            "devoted to constructing machines that think.",
        },
    ]


def test_embedded_corpus_prepares_quickly(tok):
    import time

    start = time.perf_counter()
    splits = prepare_data(None, tok, 256, False, 0.05, 200, seed=42)
    elapsed = time.perf_counter() - start
    assert elapsed < 15  # ~1-2 s here; the bound only catches a pathological slowdown
    stats = splits.stats
    assert stats.eval_rows == 101 and stats.train_rows == 2025 - 101
    assert len(splits.eval) + len(splits.train) + stats.dropped == 2025
    assert stats.train_label_tokens > 0
    assert all(len(e["input_ids"]) <= 256 for e in splits.train)


def test_missing_corpus_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a)
    )
    message = one_line_error(lambda: load_rows(None))
    assert "pip install --no-deps chatterbot-corpus" in message


def test_stats_are_plain_data(tok, tmp_path):
    splits = prepare_data(str(write_jsonl(tmp_path / "d.jsonl", INSTRUCTION_ROWS)), tok, 64, False, 0.0, 0, seed=0)
    assert json.loads(json.dumps(splits.stats.to_dict()))["rows_read"] == 3
    assert splits.eval == [] and splits.stats.eval_rows == 0
    assert data.DataSplits.__dataclass_fields__.keys() == {"train", "eval", "stats"}


def test_line_breaks_inside_values_survive(tmp_path):
    texts = ["one\u2028two", "three\nfour", "five\r\nsix"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\r\n" for t in texts))
    rows, _ = load_rows(str(jsonl))
    assert [row["text"] for row in rows] == texts and rows[2]["where"] == "line 3"
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([[t] for t in texts])
    rows, _ = load_rows(str(path))
    assert [row["text"] for row in rows] == texts
