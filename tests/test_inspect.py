"""`l1ra-lite inspect`: rank summaries of run folders and bare adapter folders."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import l1ra_lite.cli as cli
from l1ra_lite.errors import UserError
from l1ra_lite.ui.inspect import render_summary, summarize, write_png

TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BUDGET = 112  # 4 layers x 7 modules x rank 4


def layer_path(layer: int, mtype: str) -> str:
    return f"model.layers.{layer}.{mtype}"


def write_run(folder) -> None:
    """A run folder's ranks.json: two reallocations at steps 20 and 40."""
    start = {layer_path(i, t): 4 for i in range(4) for t in TYPES}
    first = dict(start)
    first[layer_path(0, "self_attn.k_proj")] = 1
    first[layer_path(1, "self_attn.k_proj")] = 2
    first[layer_path(2, "mlp.up_proj")] = 9
    second = dict(first)
    second[layer_path(0, "self_attn.q_proj")] = 2
    second[layer_path(3, "mlp.down_proj")] = 6
    history = [
        {
            "step": 20,
            "pruned": {layer_path(0, "self_attn.k_proj"): 3, layer_path(1, "self_attn.k_proj"): 2},
            "added": {layer_path(2, "mlp.up_proj"): 5},
            "ranks": first,
        },
        {
            "step": 40,
            "pruned": {layer_path(0, "self_attn.q_proj"): 2},
            "added": {layer_path(3, "mlp.down_proj"): 2},
            "ranks": second,
        },
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ranks.json").write_text(json.dumps({"budget": BUDGET, "ranks": second, "history": history}))


def write_adapter(folder, ranks: dict[str, int], rank_pattern: dict[str, int] | None = None) -> None:
    """A peft LoRA folder as l1ra_lite.peft_adapter writes it (hidden 16, so in = out = 16)."""
    tensors = {}
    for path, r in ranks.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.zeros(r, 16, dtype=torch.bfloat16)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.zeros(16, r, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 3,
        "lora_alpha": 3.0,
        "rank_pattern": rank_pattern if rank_pattern is not None else ranks,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def adapter_ranks() -> dict[str, int]:
    ranks = {layer_path(i, t): 3 for i in range(2) for t in TYPES}
    ranks[layer_path(0, "mlp.down_proj")] = 5
    ranks[layer_path(1, "self_attn.v_proj")] = 1
    return ranks


def run_cli(monkeypatch, capsys, *argv):
    # Only this subcommand: the test must not depend on other subcommands importing.
    monkeypatch.setattr(cli, "COMMANDS", ["inspect"])
    code = cli.main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_summary_totals_equal_the_budget_and_add_up(tmp_path):
    write_run(tmp_path / "run")
    summary = summarize(tmp_path / "run")

    assert summary["source"] == "run"
    assert summary["budget"] == summary["total_rank"] == BUDGET
    assert summary["modules"] == 28
    assert summary["by_type"] == {
        "q_proj": 14,
        "k_proj": 11,
        "v_proj": 16,
        "o_proj": 16,
        "gate_proj": 16,
        "up_proj": 21,
        "down_proj": 18,
    }
    assert summary["by_layer"] == {"0": 23, "1": 26, "2": 33, "3": 30}
    assert sum(summary["by_type"].values()) == sum(summary["by_layer"].values()) == BUDGET
    assert sum(summary["ranks"].values()) == BUDGET
    assert summary["initial"] == {"total_rank": BUDGET, "by_type": {t.split(".")[1]: 16 for t in TYPES}}
    assert [h["step"] for h in summary["history"]] == [20, 40]
    assert [(h["pruned"], h["added"]) for h in summary["history"]] == [(5, 5), (2, 2)]
    assert summary["history"][0]["by_type"]["k_proj"] == 11
    assert summary["history"][0]["by_type"]["up_proj"] == 21
    assert summary["history"][1]["by_type"]["q_proj"] == 14
    for entry in summary["history"]:
        assert entry["total_rank"] == sum(entry["by_type"].values()) == BUDGET
    assert summary["warnings"] == []


def test_terminal_rendering_shows_totals_heat_map_and_history(tmp_path):
    write_run(tmp_path / "run")
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render_summary(summarize(tmp_path / "run")))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]

    assert "total rank 112 / budget 112 over 28 modules" in lines
    assert "7 of 112 ranks moved: up +5, down +2 from k -5, q -2" in lines  # as the run's last line says
    assert any(line.startswith("up ") and line.endswith("21 4 5.25 18.8%") for line in lines)
    assert any(line.startswith("L0 23 L1 26 L2 33 L3 30") for line in lines)
    assert "up 4 4 9 4" in lines  # heat-map row: layer 2's up projection holds 9
    assert "k 1 2 4 4" in lines
    assert "step q k v o gate up down total pruned added" in lines
    assert "start 16 16 16 16 16 16 16 112" in lines
    assert "20 16 11 16 16 16 21 16 112 5 5" in lines
    assert "40 14 11 16 16 16 21 18 112 2 2" in lines


def test_bare_adapter_folder_ranks_come_from_the_tensor_shapes(tmp_path):
    ranks = adapter_ranks()
    write_adapter(tmp_path / "adapter", ranks)
    summary = summarize(tmp_path / "adapter")

    assert summary["source"] == "adapter"
    assert summary["ranks"] == ranks
    assert summary["total_rank"] == summary["budget"] == 3 * 14 + 2 - 2
    assert summary["by_type"]["down_proj"] == 8 and summary["by_type"]["v_proj"] == 4
    assert summary["by_layer"] == {"0": 23, "1": 19}
    assert sum(summary["by_type"].values()) == sum(summary["by_layer"].values()) == summary["total_rank"]
    assert summary["history"] == [] and summary["initial"]["total_rank"] == summary["total_rank"]
    assert summary["warnings"] == []
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render_summary(summary))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert "now 6 6 4 6 6 6 8 42" in lines  # no history: the one row is the adapter as it is
    assert "no reallocation recorded" in lines


def test_adapter_config_that_disagrees_with_the_tensors_is_flagged(tmp_path):
    ranks = adapter_ranks()
    # peft-style short key ('layers.0.mlp.down_proj') matches as a suffix; r = 3 covers the rest.
    write_adapter(tmp_path / "adapter", ranks, rank_pattern={"layers.0.mlp.down_proj": 6})
    summary = summarize(tmp_path / "adapter")
    assert summary["warnings"] == [
        "model.layers.0.mlp.down_proj: tensors have rank 5, adapter_config.json says 6",
        "model.layers.1.self_attn.v_proj: tensors have rank 1, adapter_config.json says 3",
    ]


def test_run_folder_without_ranks_json_falls_back_to_its_adapter(tmp_path):
    write_adapter(tmp_path / "run" / "adapter", adapter_ranks())
    summary = summarize(tmp_path / "run")
    assert summary["source"] == "adapter"
    assert summary["total_rank"] == 42


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([1, 2]), "top level must be an object"),
        (json.dumps({"ranks": {"a": 1}}), "'budget' must be a positive integer"),
        (json.dumps({"budget": 4, "ranks": {"model.layers.0.q_proj": "4"}}), "must be a non-negative integer"),
        (
            json.dumps({"budget": 4, "ranks": {"model.layers.0.q_proj": 4}, "history": [{"step": 2}]}),
            "history[0].ranks",
        ),
    ],
)
def test_corrupt_ranks_json_is_one_clear_user_error(tmp_path, content, message):
    (tmp_path / "ranks.json").write_text(content)
    with pytest.raises(UserError) as err:
        summarize(tmp_path)
    assert message in str(err.value)
    assert "ranks.json" in str(err.value) and "\n" not in str(err.value)


def test_bad_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        summarize(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a run folder"):
        summarize(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        summarize(tmp_path / "file.txt")

    broken = tmp_path / "broken"
    write_adapter(broken, adapter_ranks())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        summarize(broken)

    other = tmp_path / "ia3"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(UserError, match="IA3 adapter"):
        summarize(other)


def test_cli_json_parses_and_adds_up(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    code, out, err = run_cli(monkeypatch, capsys, tmp_path / "run", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["total_rank"] == data["budget"] == BUDGET
    assert sum(data["by_type"].values()) == sum(data["by_layer"].values()) == BUDGET
    assert [h["step"] for h in data["history"]] == [20, 40]
    assert all(sum(h["by_type"].values()) == BUDGET for h in data["history"])


def test_cli_prints_tables_by_default(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    code, out, _ = run_cli(monkeypatch, capsys, tmp_path / "run")
    assert code == 0
    assert "total rank 112 / budget 112" in out
    assert "allocation over time" in out


def test_cli_png_writes_a_picture_and_never_overwrites(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    png = tmp_path / "ranks.png"
    code, out, err = run_cli(monkeypatch, capsys, tmp_path / "run", "--png", png, "--json")
    assert code == 0
    assert json.loads(out)["total_rank"] == BUDGET  # the PNG note goes to stderr, not into the JSON
    assert err.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

    code, _, err = run_cli(monkeypatch, capsys, tmp_path / "run", "--png", png)
    assert code == 2
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert png.read_bytes() == data


def test_png_of_an_adapter_without_history(tmp_path):
    write_adapter(tmp_path / "adapter", adapter_ranks())
    write_png(summarize(tmp_path / "adapter"), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_png_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    # A None entry in sys.modules makes `import matplotlib...` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    png = tmp_path / "ranks.png"
    code, _, err = run_cli(monkeypatch, capsys, tmp_path / "run", "--png", png)
    assert code == 2
    assert err.strip() == ("l1ra-lite inspect: error: --png needs matplotlib: pip install 'l1ra-lite[plot]'")
    assert not png.exists()


def test_cli_bad_folder_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, tmp_path)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "neither a run folder" in err


def test_inspect_is_registered():
    assert "inspect" in cli.COMMANDS


def write_metrics(folder) -> None:
    """metrics.jsonl as the loop writes it: 50 steps, eval every 25, one skipped (NaN) step,
    and a last line cut short by a kill."""
    lines = []
    for step in range(1, 51):
        entry = {"step": step, "loss": float("nan") if step == 7 else 3.0 - step / 50, "lr": 1e-4}
        if step % 25 == 0:
            entry.update(eval_loss=2.9 - step / 100, eval_ppl=1.0)
        lines.append(json.dumps(entry))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 51, "lo')


def test_loss_curves_come_from_metrics_without_skipped_steps_or_broken_lines(tmp_path):
    from l1ra_lite.ui.inspect import read_loss_curves

    write_run(tmp_path / "run")
    write_metrics(tmp_path / "run")
    curves = read_loss_curves(tmp_path / "run")
    assert [s for s, _ in curves.train] == [s for s in range(1, 51) if s != 7]
    assert curves.train[0] == (1, pytest.approx(2.98)) and curves.eval == [(25, 2.65), (50, 2.4)]
    assert not read_loss_curves(tmp_path / "nowhere")  # a bare adapter folder: no curves, no error


def test_png_of_a_run_adds_the_loss_and_eval_curves_with_the_reallocations_marked(tmp_path, monkeypatch, capsys):
    from l1ra_lite.ui.inspect import figure, read_loss_curves

    write_run(tmp_path / "run")
    write_metrics(tmp_path / "run")
    summary, curves = summarize(tmp_path / "run"), read_loss_curves(tmp_path / "run")
    loss_ax = figure(summary, curves).axes[2]
    assert loss_ax.get_title() == "loss over time"
    train, evals, *marks = loss_ax.get_lines()
    assert list(train.get_xdata()) == [s for s, _ in curves.train] and list(evals.get_ydata()) == [2.65, 2.4]
    assert [m.get_xdata()[0] for m in marks] == [20, 40]  # the two reallocations
    titles = [ax.get_title() for ax in figure(summary).axes]
    assert "loss over time" not in titles and "rank per module type over time" in titles  # no metrics, no curves

    png = tmp_path / "run.png"
    code, _, _ = run_cli(monkeypatch, capsys, tmp_path / "run", "--png", png)
    height = int.from_bytes(png.read_bytes()[20:24], "big")  # the PNG header's IHDR height
    assert code == 0 and height == 1125  # three rows of 3.75 inches at 100 dpi
