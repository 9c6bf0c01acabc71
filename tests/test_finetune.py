"""`finetune` end to end on a tiny model: run folder, peft-loadable adapter, exact resume,
stock LoRA / AdaLoRA through the same loop, bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from l1ra_lite.cli import main
from l1ra_lite.config import FinetuneConfig, validate
from l1ra_lite.errors import UserError
from l1ra_lite.l1ra import inject_adapters
from l1ra_lite.train import Interrupted, train


def tiny_config(workdir, **overrides) -> FinetuneConfig:
    values = dict(
        model=str(workdir / "base"),
        data=str(workdir / "data.jsonl"),
        quant="none",
        budget=28,
        max_steps=10,
        batch_size=4,
        grad_accum=2,
        seq_len=64,
        lr=5e-3,
        warmup=2,
        update_every=3,
        l1_lambda=6.0,
        eta_c=0.05,
        eval_every=5,
        save_every=5,
        seed=7,
        plain=True,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def run(workdir, name, events=None, **overrides):
    run_dir = workdir / name
    run_dir.mkdir()
    report = events.append if events is not None else (lambda event: None)
    adapter = train(tiny_config(workdir, **overrides), run_dir, report, device="cpu")
    return run_dir, adapter


def in_training_model(workdir, run_dir):
    """The model as training left it: base + L1RA adapters from the last checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    ranks = json.loads((run_dir / "ranks.json").read_text())["ranks"]
    config = json.loads((run_dir / "config.json").read_text())
    inject_adapters(model, config["budget"], alpha=config["alpha"], ranks=ranks)
    latest = json.loads((run_dir / "latest").read_text())["checkpoint"]
    model.load_state_dict(load_file(str(run_dir / latest / "trainable.safetensors")), strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def finished(workdir):
    events = []
    run_dir, adapter = run(workdir, "straight", events)
    return run_dir, adapter, events


def test_run_folder_has_config_ranks_metrics_checkpoints_and_adapter(finished):
    run_dir, adapter, events = finished
    config = json.loads((run_dir / "config.json").read_text())
    assert config["budget"] == 28 and config["total_steps"] == 10 and config["base_model_path"].endswith("base")
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert ranks["budget"] == 28 and sum(ranks["ranks"].values()) == 28
    assert [h["step"] for h in ranks["history"]] == [3, 6, 9]  # after warmup (2), never the last step
    for h in ranks["history"]:
        assert sum(h["ranks"].values()) == 28 and sum(h["pruned"].values()) == sum(h["added"].values())
    assert sum(sum(h["pruned"].values()) for h in ranks["history"]) > 0  # strong L1: rank did move
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 11))
    for key in ("loss", "lr", "tokens_per_s", "mem_bytes", "rank_total"):
        assert all(key in m for m in lines)
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [5, 10]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert json.loads((run_dir / "latest").read_text())["checkpoint"] == "checkpoint-10"
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished" and kinds.count("Reallocated") == 3


def test_adapter_is_a_standard_lora_that_stock_peft_loads_with_equal_logits(workdir, finished):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, adapter, _ = finished
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["alpha_pattern"] and not config["use_rslora"]
    ranks = json.loads((run_dir / "ranks.json").read_text())["ranks"]
    assert config["rank_pattern"] == ranks  # full module paths
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{p}.lora_{x}.weight" for p in ranks for x in "AB"}
    assert (adapter / "chat_template.jinja").exists() or "chat_template" in (
        adapter / "tokenizer_config.json"
    ).read_text()

    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = in_training_model(workdir, run_dir)(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
        plain = base(input_ids=x).logits
        loaded = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=x).logits
    assert (loaded - expected).abs().max().item() <= 1e-4
    assert (loaded - plain).abs().max().item() > 1e-3  # the adapter did learn something


def stop_after(n_steps):
    """A should_stop that asks to stop once `n_steps` steps are done."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] >= n_steps

    return should_stop


def run_with_a_stop(workdir, name, stop_at, resume_overrides=None, **overrides):
    run_dir = workdir / name
    run_dir.mkdir()
    with pytest.raises(Interrupted) as stopped:
        train(tiny_config(workdir, **overrides), run_dir, lambda e: None, should_stop=stop_after(stop_at), device="cpu")
    assert stopped.value.step == stop_at
    assert json.loads((run_dir / "latest").read_text())["step"] == stop_at
    config = tiny_config(workdir, **{**overrides, **(resume_overrides or {})})
    train(config, run_dir, lambda e: None, resume=True, device="cpu")
    return run_dir


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_resume_continues_exactly(workdir, finished):
    straight, _, _ = finished
    resumed = run_with_a_stop(workdir, "resumed", 4)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks_a, ranks_b = (json.loads((d / "ranks.json").read_text()) for d in (straight, resumed))
    assert ranks_a == ranks_b
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_resume_with_another_batch_split_reads_the_same_data(workdir, finished):
    straight, _, _ = finished
    resumed = run_with_a_stop(workdir, "resplit", 4, resume_overrides={"batch_size": 2, "grad_accum": 4})
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    # Same examples in each step; only the summation order of the accumulation differs.
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert json.loads((straight / "ranks.json").read_text()) == json.loads((resumed / "ranks.json").read_text())


def test_adalora_resumes_exactly_in_its_final_phase(workdir):
    common = dict(method="adalora", max_steps=10, save_every=0, eval_every=0, warmup=1)
    straight = workdir / "adalora-straight"
    straight.mkdir()
    train(tiny_config(workdir, **common), straight, lambda e: None, device="cpu")
    resumed = run_with_a_stop(workdir, "adalora-resumed", 9, **common)  # past total - tfinal
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reallocation_waits_for_warmup_and_skips_the_last_step():
    from l1ra_lite.train import plan_schedule

    schedule = plan_schedule(FinetuneConfig(max_steps=12, warmup=3, update_every=3), 100)
    assert [s for s in range(13) if schedule.reallocates_at(s)] == [6, 9]
    assert schedule.first_update == 6 and schedule.next_update(6) == 9 and schedule.next_update(9) is None
    # Resumed at any step, the next one is the same as the uninterrupted run's.
    every20 = plan_schedule(FinetuneConfig(max_steps=100, warmup=0, update_every=20), 100)
    assert [every20.next_update(s) for s in (0, 25, 40, 95)] == [20, 40, 60, None]
    fractions = plan_schedule(FinetuneConfig(max_steps=200, warmup=0.03, update_every=0.05), 100)
    assert (fractions.warmup_steps, fractions.update_every) == (6, 10)
    window = plan_schedule(FinetuneConfig(max_steps=20, warmup=2, update_every=3, shrink_until=0.6), 100)
    assert [s for s in range(21) if window.reallocates_at(s)] == [3, 6, 9] and window.next_update(9) is None
    by_epochs = plan_schedule(FinetuneConfig(epochs=2, batch_size=4, grad_accum=2), 37)
    assert by_epochs.total_steps == 10 and by_epochs.steps_per_epoch == 5  # ceil(2 * 37 / 8)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_stock_peft_methods_run_through_the_same_loop(workdir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, adapter = run(workdir, f"run-{method}", method=method, max_steps=6, save_every=0, eval_every=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and "eval_loss" in lines[-1]
    if method == "lora":
        assert sum(config["rank_pattern"].values()) == 28  # same initial ranks as L1RA
        base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
        PeftModel.from_pretrained(base, str(adapter))
    else:
        assert config["target_r"] == 2 and config["init_r"] == 3 and config["deltaT"] == 3
        assert json.loads((run_dir / "ranks.json").read_text())["budget"] == 2 * 14  # the total it ends at


@pytest.mark.parametrize("method", ["lora", "l1ra"])
def test_a_run_starts_from_the_layout_another_run_ended_with(workdir, finished, method):
    """--ranks-from: stock LoRA (or L1RA) at the layout L1RA found, at that run's total."""
    layout = json.loads((finished[0] / "ranks.json").read_text())["ranks"]
    paths = list(layout)
    layout.update({paths[0]: 1, paths[1]: 3, paths[2]: 4, paths[3]: 1, paths[4]: 1})  # was 2 each: still 28
    source = workdir / f"layout-{method}.json"
    source.write_text(json.dumps({"budget": 28, "ranks": layout}))
    run_dir, adapter = run(
        workdir, f"from-layout-{method}", method=method, budget=None, ranks_from=str(source), update_every=0
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: v for k, v in config["rank_pattern"].items() if v != config["r"]} == {
        k: v for k, v in layout.items() if v != config["r"]
    }
    assert json.loads((run_dir / "ranks.json").read_text())["ranks"] == layout
    assert json.loads((run_dir / "config.json").read_text())["budget"] == 28


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(budget=30), "holds 28 ranks but --budget is 30; leave --budget out"),
        (dict(target_modules=["q_proj"]), "its modules are not the ones this run adapts"),
    ],
)
def test_a_layout_that_does_not_fit_the_run_is_refused(workdir, finished, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(workdir, ranks_from=str(finished[0]), **overrides), tmp_path, lambda e: None, device="cpu")
    with pytest.raises(UserError, match="ranks-from applies to --method l1ra or lora"):
        validate(tiny_config(workdir, ranks_from=str(finished[0]), method="adalora"))
    (tmp_path / "ranks.json").write_text('{"ranks": {"model.layers.0.self_attn.q_proj": 0}}')
    with pytest.raises(UserError, match="rank \\(a whole number >= 1\\)"):
        train(tiny_config(workdir, ranks_from=str(tmp_path)), tmp_path, lambda e: None, device="cpu")


def test_nf4_base_with_the_default_budget(workdir):
    run_dir, adapter = run(
        workdir, "nf4", quant="nf4", budget=None, max_steps=3, update_every=0, save_every=0, eval_every=0
    )
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert ranks["budget"] == 8 * 14 and set(ranks["ranks"].values()) == {8}
    assert json.loads((run_dir / "config.json").read_text())["quant"] == "nf4"


# ---------------------------------------------------------------- the command line


def cli(capsys, *args):
    code = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_cli_runs_and_refuses_to_reuse_a_folder(workdir, capsys):
    out = workdir / "cli-run"
    common = [
        "--model",
        workdir / "base",
        "--data",
        workdir / "data.jsonl",
        "--quant",
        "none",
        "--max-steps",
        2,
        "--budget",
        14,
        "--seq-len",
        64,
        "--plain",
        "--output",
        out,
    ]
    code, err = cli(capsys, *common)
    assert code == 0 and (out / "adapter" / "adapter_model.safetensors").exists()
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err = cli(capsys, *common)
    assert code == 2 and "already exists" in err[-1] and "--resume" in err[-1]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    code, err = cli(capsys, "--resume", out, "--budget", 20)
    assert code == 2 and "differs from the run" in err[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt-17"], "unknown model alias 'gpt-17'; known aliases: "),
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--budget", "5"], "smaller than the number of adapters (14)"),
        (["--budget", "0"], "budget must be positive"),
        (["--recipe", "nope"], "recipe 'nope' not found"),
        (["--resume", "nowhere"], "not a run folder"),
    ],
)
def test_bad_input_gets_one_clear_line(workdir, capsys, tmp_path, args, message):
    defaults = {"--model": workdir / "base", "--data": workdir / "data.jsonl"}
    for i in range(0, len(args), 2):
        defaults.pop(args[i], None)
    extra = [x for kv in defaults.items() for x in kv] if "--resume" not in args else []
    code, err = cli(capsys, *args, *extra, "--quant", "none", "--max-steps", 1, "--plain", "--output", tmp_path / "out")
    assert code == 2
    assert len(err) >= 1 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_recipe_with_an_unknown_key_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "smollm2-135m"\nbudgett = 3\n[meta]\ncard = "x"\n')
    code, err = cli(capsys, "--recipe", recipe)
    assert code == 2 and "unknown key(s) budgett" in err[-1]


# ---------------------------------------------------------------- what later commands read


def test_inspect_reads_a_finished_run(finished, capsys, tmp_path):
    run_dir, _, _ = finished
    assert main(["inspect", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["budget"] == summary["total_rank"] == 28
    assert sum(summary["by_type"].values()) == 28 and sum(summary["by_layer"].values()) == 28
    assert [h["step"] for h in summary["history"]] == [3, 6, 9]
    assert all(sum(h["by_type"].values()) == 28 for h in summary["history"])
    assert main(["inspect", str(run_dir)]) == 0
    assert "28" in capsys.readouterr().out
    assert main(["inspect", str(run_dir), "--png", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_export_of_a_finished_run_equals_the_in_training_model(workdir, finished, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = finished
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--format", "hf", "--dtype", "f32", "--out", str(out)]) == 0
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = in_training_model(workdir, run_dir)(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=x).logits
    assert (merged - expected).abs().max().item() <= 1e-3


# ---------------------------------------------------------------- reallocation rules and the shrink window

WINDOW = dict(
    realloc_rule="importance",
    shrink_until=0.6,
    log_gates=True,
    l1_lambda="auto",
    l1_kappa=1.5,
    max_steps=12,
    update_every=2,
    warmup=1,
    eval_every=0,
    save_every=4,
)


def test_the_importance_rule_with_a_window_moves_rank_then_folds_and_logs_the_evidence(workdir):
    from safetensors.torch import load_file as load

    from l1ra_lite.events import RunFinished

    events = []
    run_dir, _ = run(workdir, "window", events, **WINDOW)
    summary = next(e for e in events if isinstance(e, RunFinished)).rank_summary
    assert summary.split(" ranks moved")[0].endswith(" of 28")
    history = json.loads((run_dir / "ranks.json").read_text())["history"]
    moved = sum(sum(e["added"].values()) for e in history)
    assert moved > 0 and all(e["step"] < 8 for e in history)  # the window closes at 0.6 x 12 = step 7
    assert sum(history[-1]["ranks"].values()) == 28
    logged = sorted((run_dir / "gates").glob("step-*.safetensors"))
    assert [int(p.stem[5:]) for p in logged] == [e["step"] for e in history]
    snapshot = load(str(logged[0]))
    path = next(iter(history[0]["ranks"]))
    assert {f"{path}.{k}" for k in ("gate", "exp_avg", "exp_avg_sq", "fisher", "step", "b_norm")} <= set(snapshot)
    latest = json.loads((run_dir / "latest").read_text())["checkpoint"]
    gates = [t for k, t in load(str(run_dir / latest / "trainable.safetensors")).items() if k.endswith(".gate")]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates)  # folded into B at the window's end


def test_a_run_with_a_window_resumes_exactly(workdir):
    straight, _ = run(workdir, "window-straight", **WINDOW)
    resumed = run_with_a_stop(workdir, "window-resumed", 5, **WINDOW)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "ranks.json").read_text()) == json.loads((resumed / "ranks.json").read_text())


def test_a_run_that_moves_no_rank_says_why_and_what_changes_that(workdir):
    from l1ra_lite.events import RunFinished

    events = []
    run(workdir, "no-moves", events, l1_lambda="auto", l1_kappa=0.01, max_steps=6, eval_every=0, save_every=0)
    summary = next(e for e in events if isinstance(e, RunFinished)).rank_summary
    assert summary.startswith("no rank moved") and "--l1-kappa" in summary and "0.01" in summary


def test_every_method_choice_has_a_method():
    from l1ra_lite.config import CHOICES
    from l1ra_lite.methods import METHODS

    assert set(METHODS) == set(CHOICES["method"])


# ---------------------------------------------------------------- AdaLoRA as its authors run it


def test_adalora_rank_moves_during_training_and_ends_at_its_target_total(workdir, monkeypatch):
    """peft's AdaLoRA stays plain LoRA unless `update_and_allocate` runs after every
    optimiser step: the loop must call it (with the 1-based step), and the budget schedule
    must bring the total rank from init_r a module down to exactly target_r a module."""
    from peft.tuners.adalora.model import AdaLoraModel

    calls = []
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        calls.append(global_step)
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    run_dir, adapter = run(
        workdir,
        "adalora-moves",
        method="adalora",
        max_steps=12,
        grad_accum=1,
        warmup=1,
        update_every=2,
        save_every=0,
        eval_every=0,
    )
    assert calls == list(range(1, 13))
    totals = [json.loads(line)["rank_total"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert totals[0] == 3 * 14  # init_r 3 on each of the 14 modules, nothing masked before tinit
    assert min(totals) < totals[0] and totals[-4:] == [2 * 14] * 4  # the final phase holds the target
    ranks = json.loads((run_dir / "ranks.json").read_text())["ranks"]
    assert sum(ranks.values()) == 2 * 14 and len(set(ranks.values())) > 1  # moved between modules
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sum(sum(mask) for mask in config["rank_pattern"].values()) == 2 * 14


def test_adalora_is_set_up_as_its_authors_run_it(workdir):
    from l1ra_lite.baselines import ADALORA_ALPHA, adalora_config, adalora_schedule

    # The authors' 300-step example (SQuAD v2): init_warmup 50, final_warmup 100.
    assert adalora_schedule(300, warmup_steps=9) == (50, 100)
    assert adalora_schedule(300, warmup_steps=60) == (60, 100)  # never masks during the LR warmup
    for total in range(1, 40):  # peft refuses a schedule without a budgeting phase
        tinit, tfinal = adalora_schedule(total, warmup_steps=max(1, total // 10))
        assert 0 <= tinit < total - tfinal
    config = adalora_config([f"m{i}" for i in range(210)], 840, ADALORA_ALPHA, 0.0, 300, 9, 15)
    assert (config.target_r, config.init_r, config.lora_alpha) == (4, 6, 16.0)
    assert (config.beta1, config.beta2, config.orth_reg_weight) == (0.85, 0.85, 0.1)
    assert (config.tinit, config.tfinal, config.deltaT, config.total_step) == (50, 100, 15, 300)


def test_adalora_eval_loss_is_the_cross_entropy_without_its_penalty(workdir):
    """peft adds the orthogonality penalty to every loss its AdaLoRA model returns; the
    methods' eval losses must all be the plain cross-entropy, and training keeps it."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from l1ra_lite.baselines import ADALORA_ORTH_REG_WEIGHT, PeftAdaLoRA
    from l1ra_lite.l1ra.inject import find_targets

    base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    method = PeftAdaLoRA.attach(base, find_targets(base, None), 28, 16.0, 0.0, 1e-3, 0.0, 60, 2, 5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    model = method.model
    with torch.no_grad():
        model.train()
        training = model(**batch).loss
        model.eval()
        out = model(**batch)
    logits = out.logits[:, :-1].float()
    cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(cross_entropy.item(), abs=1e-6)
    assert training.item() > cross_entropy.item() + 0.05  # ~0.1 x a penalty of ~1.7 at the init
    assert model.peft_config["default"].orth_reg_weight == ADALORA_ORTH_REG_WEIGHT  # put back after the forward


def test_the_help_shows_the_defaults_the_config_has():
    """The defaults in `finetune --help` come from FinetuneConfig, so they cannot drift."""
    import argparse
    import dataclasses

    from l1ra_lite.cli import finetune as cli_finetune

    parser = argparse.ArgumentParser()
    cli_finetune.add_arguments(parser)
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    shown = 0
    for action in parser._actions:
        value = defaults.get(action.dest)
        if value is None or isinstance(value, bool) or not action.help:
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        assert action.help.endswith(f"(default {text})"), action.dest
        assert action.help.count("default") == 1, action.dest  # no second, hand-written one
        shown += 1
    assert shown >= 20
