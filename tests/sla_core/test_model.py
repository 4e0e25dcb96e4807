"""The method on tiny BERT, GPT-2 and Llama backbones built from configs."""

from __future__ import annotations

import pytest
import torch

from sla_core import SLAConfig, attach
from sla_core.inject import SLASite
from tests.sla_core.tiny import batch, tiny_backbone

KINDS = ["bert", "gpt2", "llama"]


def _train(model, steps: int = 25, task_ids=None, labels=None, lr: float = 3e-2):
    ids, mask = batch()
    labels = labels if labels is not None else torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW(model.parameter_groups(lr, gate_lr=0.2))
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_default_sites_have_two_sites_and_two_paths_per_layer(kind):
    model = attach(tiny_backbone(kind), SLAConfig(tasks={"a": 2}))
    kinds = sorted((s.layer, s.kind) for s in model.sites)
    assert kinds == [(0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]
    assert all(s.input_module is not None for s in model.sites)
    assert model.num_candidates == 8  # 2 layers x 2 sites x 2 paths
    assert sum(isinstance(m, SLASite) for m in model.backbone.modules()) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_attaching_is_a_no_op_at_init(kind):
    ids, mask = batch()
    plain = tiny_backbone(kind)
    base = plain.base_model
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).last_hidden_state.clone()
    model = attach(plain, SLAConfig(tasks={"a": 2}, rank=4, pool_size=2)).eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # runs through every adapter
    assert torch.equal(before, seen[0])


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_gate_and_head_parameters_train(kind):
    model = attach(tiny_backbone(kind), SLAConfig(tasks={"a": 2}, rank=4))
    frozen = {n: p.clone() for n, p in model.named_parameters() if "sla_" not in n}
    trainable = {n: p.clone() for n, p in model.named_parameters() if "sla_" in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "sla_" not in n)
    _train(model, steps=3)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("up_weight" in n for n in moved) and any("sla_heads" in n for n in moved)
    assert any("sla_gates" in n for n in moved)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_task_batch_uses_each_tasks_head_and_gates(kind):
    model = attach(tiny_backbone(kind), SLAConfig(tasks={"a": 2, "b": 5}, rank=4, pool_size=2))
    ids, mask = batch()
    task_ids = torch.tensor([0, 1, 0, 1])
    labels = torch.tensor([1, 4, 0, 3])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    assert out.logits.shape == (4, 5)
    assert torch.all(out.logits[[0, 2], 2:] < -1e3)  # task a has 2 labels; the rest is padding
    assert torch.isfinite(out.loss)
    single = model.eval()(input_ids=ids[[1]], attention_mask=mask[[1]], task="b").logits
    mixed = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.allclose(single, mixed[[1]], atol=1e-5)
    with pytest.raises(ValueError, match="outside task 'a'"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([3, 0, 0, 0]), task_ids=task_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_pruning_is_exact(kind):
    model = _train(
        attach(tiny_backbone(kind), SLAConfig(tasks={"a": 2, "b": 3}, rank=4, pool_size=2)),
        task_ids=torch.tensor([0, 1, 0, 1]),
        labels=torch.tensor([1, 2, 0, 1]),
    )
    with torch.no_grad():  # close some members for some tasks, leave fractional values elsewhere
        model.sla_gates.log_alpha[0, :3] = -10.0
        model.sla_gates.log_alpha[:, 4, 0] = -10.0
        model.sla_gates.log_alpha[1, 5, 1] = 0.3
    ids, mask = batch()
    task_ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    pruned = model.prune()
    with torch.no_grad():
        after = pruned(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    with_grad = pruned(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits  # the autograd path
    assert torch.allclose(with_grad.detach(), after, atol=1e-5)  # ... equals the in-place inference path
    assert pruned.sites[2].pools["sequential"] == 1  # candidate 4's member 0 was closed for every task
    counts, new_counts = model.parameter_counts(), pruned.parameter_counts()
    assert new_counts["adapters"] < counts["adapters"] and new_counts["gates"] == 0


def test_single_task_pruning_folds_gates_and_removes_closed_candidates():
    model = _train(attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4)))
    with torch.no_grad():
        model.sla_gates.log_alpha[0, ::2] = -10.0  # close every sequential path
        model.sla_gates.log_alpha[0, 1] = 0.5  # a fractional gate value to fold
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    pruned = model.prune()
    assert all(s.pools["sequential"] == 0 for s in pruned.sites)
    pools = [m.sla_par for m in pruned.site_modules]
    assert all(p.unit_mix for p in pools)  # gate values live in the weights now
    with torch.no_grad():
        assert torch.allclose(before, pruned(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    probs = pruned.gate_probabilities()["a"]
    assert probs["layer0.attn.seq"] == 0.0 and probs["layer0.attn.par"] == 1.0


def test_target_modules_override_and_error_lists_modules():
    model = attach(tiny_backbone("llama"), SLAConfig(tasks={"a": 2}, target_modules=["q_proj", "v_proj"]))
    assert sorted(s.module.split(".")[-1] for s in model.sites) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, target_modules=r".*\.query"))
    assert len(model.sites) == 2
    with pytest.raises(ValueError, match="Linear modules that exist: .*query"):
        attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, target_modules=["nope"]))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="SLAConfig.rank=0"):
        SLAConfig(tasks={"a": 2}, rank=0)
    with pytest.raises(ValueError, match="SLAConfig.gate='l1'"):
        SLAConfig(tasks={"a": 2}, gate="l1")
    with pytest.raises(ValueError, match="task 'a' needs"):
        SLAConfig(tasks={"a": 1})


def test_sparsity_penalty_closes_gates_and_lambda_zero_does_not():
    def train(lam):
        cfg = SLAConfig(tasks={"a": 2}, rank=4, lambda_sparse=lam, gate_init=1.0, head_dropout=0.0)
        torch.manual_seed(0)
        return _train(attach(tiny_backbone("bert"), cfg), steps=60)

    dense, sparse = train(0.0), train(5.0)
    open_dense = (dense.decided_gates() > 0).float().mean()
    open_sparse = (sparse.decided_gates() > 0).float().mean()
    assert open_sparse < open_dense
    assert open_sparse <= 0.5


def test_budget_mode_moves_toward_the_target():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, gate_init=2.0, head_dropout=0.0)
    model = attach(tiny_backbone("bert"), cfg)
    target = model.sla_budget.target
    assert 0 < target < 1
    _train(model, steps=150, lr=5e-2)
    _, probs = model.sla_gates()
    from sla_core.sparsity import expected_open_fraction

    achieved = float(expected_open_fraction(probs.detach(), model.member_params))
    assert abs(achieved - target) < abs(1.0 - target) / 2  # moved at least half-way from all-open


def test_budget_target_warms_up_from_the_initial_kept_fraction():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, lambda_warmup_steps=10, head_dropout=0.0)
    controller = attach(tiny_backbone("bert"), cfg).sla_budget
    start, target = controller.start, controller.target
    assert target < start < 1.0  # P(open) at gate_init 3.0
    assert [controller.target_at(s) for s in (0, 5, 10, 50)] == pytest.approx(
        [start, (start + target) / 2, target, target]
    )
    # With the ramp the constraint starts satisfied: no push on the multipliers at the first step.
    expected = torch.tensor(start)
    controller(expected, 0).backward()
    assert controller.multipliers.grad.abs().max() < 1e-6


def test_budget_decision_keeps_the_most_probable_gates_that_fit():
    from sla_core.sparsity import fit_budget

    values = torch.tensor([[[0.9, 0.0], [0.5, 0.7]], [[0.8, 0.6], [0.0, 0.0]]])  # (T=2, C=2, K=2)
    w = torch.tensor([[1.0, 1.0], [2.0, 1.0]])  # parameters per member: 5 in all
    out = fit_budget(values, values, w, target=0.4)  # 2 parameters
    # 0.9 takes member (0, 0); 0.8 is task b on the same member (free); 0.7 takes (1, 1); 0.6 and 0.5 do
    # not fit; closed gates stay closed.
    assert torch.equal(out, torch.tensor([[[0.9, 0.0], [0.0, 0.7]], [[0.8, 0.0], [0.0, 0.0]]]))
    assert torch.equal(fit_budget(values, values, w, target=1.0), values)


def test_budget_mode_ships_at_most_the_budget_and_pruning_stays_exact():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, head_dropout=0.0)
    model = _train(attach(tiny_backbone("bert"), cfg), steps=3)  # gates still nearly all open
    counts = model.parameter_counts()
    assert counts["adapters"] + counts["heads"] > 0.05 * counts["backbone"]  # so the budget must cut
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits  # eval mode: the budgeted gates
    pruned = model.prune()
    with torch.no_grad():
        after = pruned(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-4)
    shipped = pruned.parameter_counts()
    assert 0 < shipped["adapters"] and shipped["adapters"] + shipped["heads"] <= 0.05 * counts["backbone"]


def test_sigmoid_gate_option_trains_and_prunes():
    model = _train(attach(tiny_backbone("gpt2"), SLAConfig(tasks={"a": 2}, rank=4, gate="sigmoid")), steps=5)
    pruned = model.prune()
    assert pruned.parameter_counts()["gates"] == 0
    assert set(model.gate_probabilities()["a"]) == set(model.candidate_names())


def test_fixed_gates_keep_every_adapter_and_learn_no_gate():
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, gate="fixed", lambda_sparse=0.0))
    assert model.parameter_counts()["gates"] == 0
    _train(model, steps=3)
    pruned = model.prune()
    assert pruned.parameter_counts()["adapters"] == model.parameter_counts()["adapters"]
    assert all(p == 1.0 for p in model.gate_probabilities()["a"].values())


def test_multi_task_penalty_gradient_does_not_vanish_when_other_tasks_hold_a_member_open():
    from sla_core.sparsity import expected_open_fraction, expected_open_gates

    w = torch.tensor([[3.0, 1.0]])  # (C=1, K=2)
    probs = torch.full((3, 1, 2), 0.95, requires_grad=True)
    expected_open_gates(probs, w).backward()
    assert torch.allclose(probs.grad, w.expand(3, 1, 2) / (3 * w.sum()))
    union = torch.full((3, 1, 2), 0.95, requires_grad=True)
    expected_open_fraction(union, w).backward()
    assert bool((union.grad < 0.01 * probs.grad).all())  # 3 x 0.05^2: why the union is not the penalty
    one = torch.rand(1, 1, 2)
    assert torch.allclose(expected_open_gates(one, w), expected_open_fraction(one, w))


def test_multi_task_sparsity_closes_shared_pool_gates():
    cfg = SLAConfig(tasks={"a": 2, "b": 3}, rank=4, pool_size=2, lambda_sparse=5.0, head_dropout=0.0)
    model = attach(tiny_backbone("bert"), cfg)
    _, before = model.sla_gates()
    _train(model, steps=60, task_ids=torch.tensor([0, 1, 0, 1]), lr=5e-2)
    _, after = model.sla_gates()
    assert float(after.detach().mean()) < float(before.detach().mean()) - 0.2
