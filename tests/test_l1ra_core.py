"""The L1RA layer, its optimiser step and physical resize, on tiny models (CPU)."""

import math

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from l1ra_lite.errors import UserError
from l1ra_lite.l1ra import L1RALinear, L1RAOptimizer, RankState, initial_ranks, inject_adapters, reallocate
from l1ra_lite.l1ra.inject import adapter_parameters
from l1ra_lite.l1ra.realloc import resize_adapter
from tests.tiny import random_batch, tiny_llama


def trained_tiny(budget=30, steps=3, seed=0, **opt):
    """A tiny Llama with adapters, trained a few steps so that B and the moments are not zero."""
    model = tiny_llama(seed)
    adapters = inject_adapters(model, budget=budget, seed=seed)
    optimizer = L1RAOptimizer(adapters.values(), lr=1e-2, **opt)
    for step in range(steps):
        x = random_batch(step)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, adapters, optimizer


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# ---------------------------------------------------------------- layer and injection


def test_forward_is_base_plus_gated_low_rank_update():
    base = nn.Linear(8, 6)
    layer = L1RALinear(base, rank=3, scale=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.copy_(torch.tensor([1.0, 0.3, 0.0]))
    x = torch.randn(4, 8)
    expected = base(x) + 0.5 * (layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A @ x.T).T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A)


def test_init_matches_peft_scale_and_starts_as_identity():
    layer = L1RALinear(nn.Linear(400, 10), rank=64, scale=1.0)
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.all(layer.lora_B == 0) and torch.all(layer.gate == 1)


def test_injection_targets_decoder_linears_with_the_budget_spread_evenly():
    model = tiny_llama()
    adapters = inject_adapters(model, budget=30)
    assert len(adapters) == 14  # 7 linear layers x 2 blocks, never lm_head
    assert all("layers." in p for p in adapters) and "lm_head" not in " ".join(adapters)
    assert sum(a.rank for a in adapters.values()) == 30
    assert [a.rank for a in adapters.values()] == [3, 3] + [2] * 12
    assert {a.scale for a in adapters.values()} == {1.0}  # alpha defaults to the mean rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{k}" for p in adapters for k in ("lora_A", "lora_B", "gate")}


def test_injection_by_name_and_alpha_sets_one_scale():
    model = tiny_llama()
    adapters = inject_adapters(model, budget=8, target_modules=["q_proj", "v_proj"], alpha=8)
    assert sorted({p.rsplit(".", 1)[1] for p in adapters}) == ["q_proj", "v_proj"]
    assert {a.scale for a in adapters.values()} == {4.0}  # alpha / r_mean = 8 / 2
    with pytest.raises(UserError, match="no linear layer matches"):
        inject_adapters(tiny_llama(), budget=8, target_modules=["nope"])


@pytest.mark.parametrize("budget", [0, -3, 13])
def test_bad_budgets_are_refused_with_a_clear_message(budget):
    with pytest.raises(UserError, match="budget"):
        inject_adapters(tiny_llama(), budget=budget)


def test_initial_ranks():
    assert initial_ranks(512, 224) == [3] * 64 + [2] * 160
    assert sum(initial_ranks(512, 224)) == 512


# ---------------------------------------------------------------- function preservation


def test_adding_ranks_leaves_the_logits_unchanged():
    model, adapters, optimizer = trained_tiny()
    x = random_batch(99)
    before = logits(model, x)
    gen = torch.Generator().manual_seed(1)
    for adapter in adapters.values():
        resize_adapter(adapter, list(range(adapter.rank)), 3, optimizer, gen)
    assert (logits(model, x) - before).abs().max().item() <= 1e-6


def test_removing_ranks_equals_setting_their_gates_to_zero():
    model, adapters, optimizer = trained_tiny()
    x = random_batch(99)
    drop = {p: [0] for p in list(adapters)[::2]}  # drop rank 0 of every other adapter
    with torch.no_grad():
        saved = {p: adapters[p].gate.clone() for p in drop}
        for p, idx in drop.items():
            adapters[p].gate[idx] = 0.0
        zeroed = logits(model, x)
        for p in drop:
            adapters[p].gate.copy_(saved[p])
    assert (zeroed - logits(model, x)).abs().max() > 1e-4  # the dropped ranks did matter
    for p, idx in drop.items():
        keep = [j for j in range(adapters[p].rank) if j not in idx]
        resize_adapter(adapters[p], keep, 0, optimizer)
    assert (logits(model, x) - zeroed).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- memory follows rank


def held_elements(adapters, optimizer):
    """Elements of storage actually held by adapter params, grads and optimiser state."""
    total = 0
    for p in adapter_parameters(adapters):
        tensors = (
            [p]
            + ([p.grad] if p.grad is not None else [])
            + [v for v in optimizer.state[p].values() if torch.is_tensor(v)]
        )
        total += sum(t.untyped_storage().nbytes() // t.element_size() for t in tensors)
    return total


def implied_elements(adapters):
    # per rank: A row (in) + B column (out) + gate (1), each x4 (param, grad, 2 moments),
    # plus the per-rank step count of each of the three parameters and the gate's fisher
    return sum(a.rank * ((a.in_features + a.out_features + 1) * 4 + 3 + 1) for a in adapters.values())


def test_memory_follows_the_ranks_after_growing_and_shrinking():
    model, adapters, optimizer = trained_tiny(budget=28)
    x = random_batch(5)
    model(input_ids=x, labels=x).loss.backward()  # grads present during the resize
    assert held_elements(adapters, optimizer) == implied_elements(adapters)
    paths = list(adapters)
    old = [
        StorageWeakRef(t.untyped_storage())
        for p in paths[:2]
        for t in (adapters[p].lora_A, adapters[p].lora_A.grad, optimizer.state[adapters[p].lora_A]["exp_avg"])
    ]
    resize_adapter(adapters[paths[0]], [0], 0, optimizer)  # shrink 2 -> 1
    resize_adapter(adapters[paths[1]], [0, 1], 5, optimizer)  # grow 2 -> 7
    assert [adapters[p].rank for p in paths[:2]] == [1, 7]
    assert held_elements(adapters, optimizer) == implied_elements(adapters)
    assert all(ref.expired() for ref in old), "old tensors are still referenced"


# ---------------------------------------------------------------- optimiser


def test_a_and_b_follow_torch_adamw_and_gates_follow_adam_plus_l1():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    ours = L1RALinear(base, rank=3, scale=1.0)
    ref = L1RALinear(base, rank=3, scale=1.0)
    ref.load_state_dict(ours.state_dict())
    opt = L1RAOptimizer([ours], lr=1e-2, weight_decay=0.1, eta_c=0.05, l1_lambda=0.2)
    ref_ab = torch.optim.AdamW([ref.lora_A, ref.lora_B], lr=1e-2, weight_decay=0.1)
    ref_c = torch.optim.Adam([ref.gate], lr=0.05)
    for _step in range(5):
        x = torch.randn(7, 6)
        for layer in (ours, ref):
            layer(x).pow(2).sum().backward()
        opt.step()
        ref_ab.step()
        ref_c.step()
        with torch.no_grad():  # the decoupled L1 shrink with its dead zone, then the clamp
            t = 0.05 * 0.2
            ref.gate.sub_(t * ((ref.gate > t).float() - (ref.gate < -t).float())).clamp_(0, 1)
        for o in (opt, ref_ab, ref_c):
            o.zero_grad()
        for name in ("lora_A", "lora_B", "gate"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    assert opt.prune_threshold == pytest.approx(0.01)


def test_l1_shrink_has_a_dead_zone_and_clamps_to_the_unit_interval():
    layer = L1RALinear(nn.Linear(2, 2), rank=4, scale=1.0)
    opt = L1RAOptimizer([layer], eta_c=0.1, l1_lambda=0.5)  # shrink 0.05 per step
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1.0, 0.5, 0.04, 0.06]))
    layer.gate.grad = torch.zeros(4)  # no gradient: only the shrink acts
    layer.lora_A.grad = layer.lora_B.grad = None
    opt.step()
    torch.testing.assert_close(layer.gate.detach(), torch.tensor([0.95, 0.45, 0.04, 0.01]))
    layer.gate.grad = torch.full((4,), -1.0)  # Adam pushes every gate up by ~eta_c
    opt.step()
    assert layer.gate.max().item() <= 1.0


def test_moments_of_surviving_ranks_are_carried_over_exactly():
    model, adapters, optimizer = trained_tiny(budget=42)
    path = list(adapters)[3]
    adapter = adapters[path]
    before = {
        k: {n: v.clone() for n, v in optimizer.state[p].items()}
        for k, p in (("A", adapter.lora_A), ("B", adapter.lora_B), ("gate", adapter.gate))
    }
    resize_adapter(adapter, [2, 0], 2, optimizer)  # keep ranks 2 and 0, add two
    after = {k: optimizer.state[p] for k, p in (("A", adapter.lora_A), ("B", adapter.lora_B), ("gate", adapter.gate))}
    keep = torch.tensor([2, 0])
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(after["A"][name][:2], before["A"][name][keep])
        assert torch.equal(after["B"][name][:, :2], before["B"][name][:, keep])
        assert torch.equal(after["gate"][name][:2], before["gate"][name][keep])
        assert torch.all(after["A"][name][2:] == 0) and torch.all(after["B"][name][:, 2:] == 0)
    for kind in ("A", "B", "gate"):
        assert after[kind]["step"].tolist() == [3.0, 3.0, 0.0, 0.0]


def test_a_rank_added_late_takes_the_first_update_of_a_fresh_optimiser():
    model, adapters, optimizer = trained_tiny(budget=28, steps=6)
    adapter = list(adapters.values())[0]
    resize_adapter(adapter, list(range(adapter.rank)), 1, optimizer, torch.Generator().manual_seed(3))
    new = adapter.rank - 1
    with torch.no_grad():
        adapter.lora_B[:, new].normal_()  # give the new rank a gradient on A
    grads = {
        "A": torch.randn_like(adapter.lora_A),
        "B": torch.randn_like(adapter.lora_B),
        "gate": torch.randn_like(adapter.gate),
    }
    # The same rank alone in a freshly started optimiser, same values, same gradient.
    fresh = L1RALinear(nn.Linear(adapter.in_features, adapter.out_features), rank=1, scale=1.0)
    with torch.no_grad():
        fresh.lora_A.copy_(adapter.lora_A[new : new + 1])
        fresh.lora_B.copy_(adapter.lora_B[:, new : new + 1])
        fresh.gate.copy_(adapter.gate[new : new + 1])
    fresh_opt = L1RAOptimizer([fresh], lr=1e-2)
    for p in list(adapters.values()):
        for q in (p.lora_A, p.lora_B, p.gate):
            q.grad = None
    adapter.lora_A.grad, adapter.lora_B.grad, adapter.gate.grad = grads["A"], grads["B"], grads["gate"]
    fresh.lora_A.grad = grads["A"][new : new + 1].clone()
    fresh.lora_B.grad = grads["B"][:, new : new + 1].clone()
    fresh.gate.grad = grads["gate"][new : new + 1].clone()
    row_before = adapter.lora_A.detach()[new].clone()
    optimizer.step()
    fresh_opt.step()
    assert torch.equal(adapter.lora_A[new : new + 1], fresh.lora_A)
    assert torch.equal(adapter.lora_B[:, new : new + 1], fresh.lora_B)
    assert torch.equal(adapter.gate[new : new + 1], fresh.gate)
    # Its first step moves every element by ~lr, as Adam's first step does; a
    # correction for the tensor's age (7 steps) would have made it ~2.5x smaller.
    moved = (adapter.lora_A.detach()[new] - row_before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=0)
    assert optimizer.state[adapter.lora_A]["step"].tolist()[-1] == 1.0


# ---------------------------------------------------------------- reallocation end to end


class TwoPathTask(nn.Module):
    """Two adapted layers: the target needs a change of the first, none of the second."""

    def __init__(self):
        super().__init__()
        self.needed = nn.Linear(16, 16, bias=False)
        self.unneeded = nn.Linear(16, 16, bias=False)


def train_two_path(seed, steps=80, update_every=40):
    torch.manual_seed(seed)
    task = TwoPathTask()
    for p in task.parameters():
        p.requires_grad_(False)
    delta = torch.randn(16, 4) @ torch.randn(4, 16) * 0.3
    w_needed, w_unneeded = task.needed.weight.clone(), task.unneeded.weight.clone()
    adapters = {
        name: L1RALinear(getattr(task, name), rank=4, scale=1.0, generator=torch.Generator().manual_seed(seed + i))
        for i, name in enumerate(("needed", "unneeded"))
    }
    optimizer = L1RAOptimizer(adapters.values(), lr=2e-2, eta_c=0.05, l1_lambda=0.5)
    state = RankState(budget=8, ranks={p: a.rank for p, a in adapters.items()})
    data = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randn(32, 16, generator=data)
        loss = (adapters["needed"](x) - x @ (w_needed + delta).T).pow(2).mean() + (
            adapters["unneeded"](x) - x @ w_unneeded.T
        ).pow(2).mean()
        loss.backward()
        del loss  # a live graph would pin the parameters' old shapes (see resize_adapter)
        optimizer.step()
        optimizer.zero_grad()
        if step % update_every == 0:
            gates_before = {p: a.gate.detach().clone() for p, a in adapters.items()}
            reallocate(
                adapters,
                state,
                step,
                optimizer.prune_threshold,
                optimizer,
                torch.Generator().manual_seed(seed * 1000 + step),
            )
            yield step, gates_before, state, adapters


def test_strong_l1_prunes_an_unneeded_adapter_and_moves_its_rank_to_a_needed_one():
    first = None
    for step, gates, state, _adapters in train_two_path(seed=0):
        if first is None:
            first = (step, gates, state.history[-1])
    step, gates, event = first
    assert gates["unneeded"].max().item() < 0.05 * 0.5 + 1e-10  # all below the threshold
    assert gates["needed"].min().item() > 0.5
    assert event.pruned == {"unneeded": 3} and event.added == {"needed": 3}
    assert state.ranks == {"needed": 7, "unneeded": 1} and state.total == 8


def test_the_same_seed_gives_the_same_allocation():
    def run(seed):
        events = [(s, dict(st.ranks)) for s, _, st, _ in train_two_path(seed, steps=60, update_every=10)]
        return events

    assert run(3) == run(3)


def test_reallocation_is_recorded_in_the_rank_state():
    model, adapters, optimizer = trained_tiny(budget=28)
    state = RankState(28, {p: a.rank for p, a in adapters.items()})
    with torch.no_grad():
        first = list(adapters.values())[0]
        first.gate[1] = 0.0
    event = reallocate(adapters, state, 7, 0.01, optimizer)
    assert event.step == 7 and sum(event.ranks.values()) == 28
    assert sum(event.pruned.values()) == sum(event.added.values()) == 1
    assert state.history == [event] and RankState.from_json(state.to_json()) == state


class CopiesOf(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output dtype of every copy (aten._to_copy) of a tensor of `numel` entries."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].numel() == self.numel:
            self.copies.append(out.dtype)
        return out


def test_under_autocast_the_adapter_makes_no_fp32_copy_of_its_input():
    """peft's LoRA lets autocast cast; an explicit cast to the fp32 master weights would
    copy every adapted layer's (tokens x in) input in fp32 and keep it for backward."""
    layer = L1RALinear(nn.Linear(64, 96).to(torch.bfloat16), rank=4, scale=1.0)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    with CopiesOf(x.numel()) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y.float().sum().backward()
    assert torch.float32 not in counter.copies
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32

    # Without autocast a bf16 input still meets fp32 weights: then the cast is needed.
    layer.zero_grad()
    with CopiesOf(x.numel()) as counter:
        layer(x).float().sum().backward()
    assert torch.float32 in counter.copies


# ---------------------------------------------------------------- the shrink window


def test_folding_the_gates_into_b_keeps_the_function_and_frees_the_ranks():
    from l1ra_lite.l1ra.method import fold_gates

    model, adapters, optimizer = trained_tiny(budget=28, steps=4)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.gate.uniform_(0.2, 0.9)  # shrunk gates, as after a window of L1
    x = random_batch(9)
    before = logits(model, x)
    b_moment = {p: optimizer.state[a.lora_B]["exp_avg"].clone() for p, a in adapters.items()}
    gates = {p: a.gate.detach().clone() for p, a in adapters.items()}
    fold_gates(adapters, optimizer)
    assert (logits(model, x) - before).abs().max() < 1e-5
    assert all(torch.equal(a.gate, torch.ones_like(a.gate)) for a in adapters.values())
    for path, adapter in adapters.items():  # moments follow B's new scale, column by column
        assert torch.allclose(optimizer.state[adapter.lora_B]["exp_avg"] * gates[path], b_moment[path], atol=1e-9)
    assert optimizer.prune_threshold < 1e-9  # the gates no longer move or shrink
    gate_before = {p: a.gate.detach().clone() for p, a in adapters.items()}
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    assert all(torch.equal(a.gate, gate_before[p]) for p, a in adapters.items())


def test_the_end_of_a_run_says_how_many_ranks_moved_and_where():
    from l1ra_lite.l1ra.rank_state import describe_moves, ranks_before_moves

    state = RankState(8, {"l.0.q_proj": 2, "l.0.k_proj": 2, "l.0.up_proj": 2, "l.0.down_proj": 2})
    state.record(
        5,
        {"l.0.k_proj": 1, "l.0.q_proj": 1},
        {"l.0.up_proj": 2},
        {"l.0.q_proj": 1, "l.0.k_proj": 1, "l.0.up_proj": 4, "l.0.down_proj": 2},
    )
    state.record(10, {"l.0.q_proj": 0}, {}, dict(state.ranks))
    before = ranks_before_moves(state)
    assert before == {"l.0.q_proj": 2, "l.0.k_proj": 2, "l.0.up_proj": 2, "l.0.down_proj": 2}
    assert describe_moves(before, state.ranks, 8) == "2 of 8 ranks moved: up +2 from k -1, q -1"
    assert describe_moves(before, before, 8) == ""
