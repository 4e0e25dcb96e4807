"""The method on tiny BERT, GPT-2 and Llama backbones built from configs."""

from __future__ import annotations

import pytest
import torch

from sla_core import SLAConfig, attach
from sla_core.inject import SLASite
from sla_core.model import SLAModel
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


def test_budget_shift_holds_the_scheduled_kept_fraction_every_step():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, lambda_warmup_steps=4, head_dropout=0.0)
    model = attach(tiny_backbone("bert"), cfg).train()
    target = model.budget_target
    assert 0 < target < 1
    assert [model._budget_target_at(f) for f in (0, 2, 4, 9)] == pytest.approx(
        [1.0, (1.0 + target) / 2, target, target]
    )
    ids, mask = batch()
    opt = torch.optim.AdamW(model.parameter_groups(3e-2, gate_lr=0.2))
    for step in range(8):
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0, 1, 0]))
        want = model._budget_target_at(step)
        assert float(out.open_fraction) == pytest.approx(want, abs=2e-3), step  # exact, not steered
        assert float(out.loss) == pytest.approx(float(out.task_loss))  # no penalty term in budget mode
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_the_budget_ramp_ends_with_the_search_when_the_search_is_shorter():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, lambda_warmup_steps=100, dense_fraction=0.2,
                    search_fraction=0.4)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=20)  # dense 0-3, search 4-11: 8 steps
    # the last search step (11) already runs at the budget
    target = model.budget_target
    assert [model._budget_target_at(f) for f in (4, 11, 12)] == pytest.approx([1.0, target, target])
    assert model._budget_target_at(8) == pytest.approx(target + (1 - target) * 3 / 7)


def test_budget_decision_is_a_knapsack_on_the_scores():
    from sla_core.sparsity import budget_mask

    scores = torch.tensor([[[0.9, 0.1], [0.5, 0.7]], [[0.8, 0.6], [0.2, 0.3]]])  # (T=2, C=2, K=2)
    w = torch.tensor([[1.0, 1.0], [2.0, 1.0]])  # parameters per member: 5 in all
    out = budget_mask(scores, w, target=0.4)  # 2 parameters
    # 0.9 takes member (0, 0); 0.8 is task b on the same member (free, above the boundary); 0.7 takes (1, 1);
    # 0.6 (the boundary) and 0.5 do not fit; 0.3 is task b on (1, 1): paid for by task a, but task b's gate
    # ranks below the boundary, so task b does not open it.
    assert torch.equal(out, torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]))
    low_b = torch.tensor([[[0.9, 0.1], [0.5, 0.7]], [[0.05, 0.6], [0.2, 0.3]]])  # b ranks nothing high
    out = budget_mask(low_b, w, target=0.4)
    assert torch.equal(out[1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # b still opens its best kept member
    assert torch.equal(budget_mask(scores, w, target=1.0), torch.ones_like(scores))
    assert not budget_mask(scores, w, target=0.1).any()  # nothing fits in half a parameter


def test_schedule_goes_dense_then_search_then_fixed_and_the_fixed_structure_is_exact():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, budget=0.05, dense_fraction=0.25, search_fraction=0.25,
                    head_dropout=0.0)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=8).train()
    ids, mask = batch()
    opt = torch.optim.AdamW(model.parameter_groups(3e-2, gate_lr=0.5))
    phases, alphas = [], []
    for _ in range(8):
        phases.append(model.phase())
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0, 1, 0]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        alphas.append(model.sla_gates.log_alpha.detach().clone())
    assert phases == ["dense"] * 2 + ["search"] * 2 + ["fixed"] * 4
    assert bool(model.sla_decided_flag) and torch.equal(model.decided_gates(), model.sla_decided)
    assert set(model.sla_decided.unique().tolist()) <= {0.0, 1.0} and model.empty_tasks() == []
    assert not torch.equal(alphas[1], alphas[3])  # the gates learned in the search
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        after = model.prune()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5)
    counts = model.parameter_counts()
    shipped = model.prune().parameter_counts()
    assert shipped["adapters"] + shipped["heads"] <= 0.05 * counts["backbone"]


def test_rewind_restarts_the_adapters_at_the_decision_and_the_same_seed_restarts_them_alike():
    def run(rewind: bool, seed: int = 0) -> tuple[SLAModel, list[torch.Tensor]]:
        cfg = SLAConfig(tasks={"a": 2}, rank=4, paths=("lora",), gate_unit="rank", budget=0.05,
                        search_fraction=0.5, head_dropout=0.0, rewind=rewind, seed=seed)  # fmt: skip
        model = attach(tiny_backbone("bert"), cfg, schedule_steps=4).train()
        _train(model, steps=2)  # the search moves every adapter
        pools = [site.sla_lora for site in model.site_modules]
        assert all(bool(p.up_weight.abs().sum() > 0) for p in pools) and not bool(model.sla_decided_flag)
        ids, mask = batch()
        model.train()(input_ids=ids, attention_mask=mask)  # the first fixed-structure forward decides
        assert bool(model.sla_decided_flag)
        return model, [p.down_weight.detach().clone() for p in pools]

    model, downs = run(rewind=True)
    assert all(float(site.sla_lora.up_weight.abs().sum()) == 0.0 for site in model.site_modules)
    bound = max(1 / site.sla_lora.in_dim**0.5 for site in model.site_modules)
    assert all(float(d.abs().max()) <= bound for d in downs)
    assert all(torch.equal(a, b) for a, b in zip(downs, run(rewind=True)[1], strict=True))  # seeded
    kept, _ = run(rewind=False)
    assert all(float(site.sla_lora.up_weight.abs().sum()) > 0 for site in kept.site_modules)
    assert torch.equal(kept.sla_decided, model.sla_decided)  # it changes the weights, not the structure


def test_the_per_parameter_ranking_divides_the_score_by_the_members_size():
    cfg = SLAConfig(tasks={"a": 2}, rank=2, paths=("lora",), gate_unit="rank", gate="sensitivity_per_param",
                    budget=0.05, search_fraction=0.5)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=10)
    scores = torch.rand(tuple(model.sla_gates.log_alpha.shape))
    assert torch.allclose(model._ranking(scores) * model.member_params, scores)
    assert len(set(model.member_params.flatten().tolist())) > 1  # sizes differ, so the order can change
    plain = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=2, paths=("lora",), gate_unit="rank",
                                                    gate="sensitivity", budget=0.05, search_fraction=0.5),
                   schedule_steps=10)  # fmt: skip
    assert torch.equal(plain._ranking(scores), scores)


@pytest.mark.parametrize("gate", ["topk", "sensitivity", "sensitivity_per_param"])
def test_straight_through_gates_train_the_budgets_structure_itself_and_the_decision_keeps_it(gate):
    from sla_core.sparsity import budget_mask

    cfg = SLAConfig(tasks={"a": 2}, rank=4, paths=("lora",), gate_unit="rank", gate=gate, budget=0.05,
                    lambda_warmup_steps=3, search_fraction=0.5, head_dropout=0.0)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=12).train()
    ids, mask = batch()
    opt = torch.optim.AdamW(model.parameter_groups(3e-2, gate_lr=0.2))
    structures = []
    for step in range(12):
        phase = model.phase()
        before = model.sla_gates.log_alpha.detach().clone()
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0, 1, 0]))
        target = model._budget_target_at(step)
        order = model._ranking(before)  # the scores, or per parameter for sensitivity_per_param
        values = model.sla_decided if phase == "fixed" else budget_mask(order, model.member_params, target)
        structures.append(values.clone())
        # the forward ran the knapsack's 0/1 structure: the kept fraction is the scheduled target's, exactly
        kept = float((values.amax(0) * model.member_params).sum() / model.member_params.sum())
        assert float(out.open_fraction) == pytest.approx(kept, abs=1e-6), step
        assert kept <= target + 1e-6
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moved = model.sla_gates.log_alpha.detach() != before
        if phase == "search" and step >= 3:  # closed units still rank: their scores move
            closed = values == 0
            assert bool(closed.any()) and bool(moved[closed].any()), step
    # the decision is the same knapsack at the budget (it can differ from the last search step only by what
    # that step's update reordered), and the fixed structure stays
    assert all(torch.equal(structures[6], x) for x in structures[7:])
    assert float((structures[5] != structures[6]).float().mean()) < 0.25
    assert not torch.equal(structures[3], torch.ones_like(structures[3]))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(logits, model.prune()(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match=f"SLAConfig.gate='{gate}'.*budget"):
        SLAConfig(tasks={"a": 2}, gate=gate)


def test_sensitivity_scores_each_task_by_its_own_mean_loss_and_an_absent_task_keeps_its_score():
    import copy

    cfg = SLAConfig(tasks={"a": 2, "b": 2}, rank=2, paths=("lora",), gate_unit="rank", gate="sensitivity",
                    budget=0.05, search_fraction=0.5, lambda_warmup_steps=2, head_dropout=0.0)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=10).train()
    model.backbone.eval()  # no dropout: rows alone give the same gradients as in the batch
    ids, mask = batch()
    labels, beta = torch.tensor([1, 0, 1, 0]), model.sla_gates.BETA
    scores = model.sla_gates.log_alpha
    with torch.no_grad():
        scores[1] = 0.5
        for (
            name,
            p,
        ) in model.named_parameters():  # trained-looking units (LoRA's up starts at zero: no effect)
            if "up_weight" in name:
                p.normal_(0, 0.1)
    model(
        input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.zeros(4, dtype=torch.long)
    ).loss.backward()
    assert torch.all(scores[1] == 0.5) and float(scores[0].abs().sum()) > 0  # b was not in the batch

    def update(rows: slice, task_ids: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model)
        before = m.sla_gates.log_alpha.clone()
        m(
            input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], task_ids=task_ids[rows]
        ).loss.backward()
        return (m.sla_gates.log_alpha - beta * before) / (1 - beta)

    mixed = torch.tensor([0, 1, 1, 1])  # one row of a, three of b: the batch's mean loss weighs b 3x
    together = update(slice(0, 4), mixed)
    assert torch.allclose(together[0], update(slice(0, 1), mixed)[0], atol=1e-5)  # a's own mean loss
    assert torch.allclose(together[1], update(slice(1, 4), mixed)[1], atol=1e-5)  # b's own mean loss
    assert float(together[0].abs().sum()) > 0 and float(together[1].abs().sum()) > 0


def test_random_decision_fits_the_budget_and_depends_on_the_seed():
    def structure(seed: int) -> torch.Tensor:
        cfg = SLAConfig(tasks={"a": 2}, rank=2, budget=0.02, decision="random", seed=seed)
        model = attach(tiny_backbone("bert"), cfg).train()
        ids, mask = batch()
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0, 1, 0]))
        assert model.phase() == "fixed" and bool(model.sla_decided_flag)
        return model.sla_decided

    assert torch.equal(structure(0), structure(0)) and not torch.equal(structure(0), structure(1))
    with pytest.raises(ValueError, match="needs a budget"):
        SLAConfig(tasks={"a": 2}, decision="random")


def test_magnitude_decision_keeps_the_units_that_moved_most_per_parameter_within_the_budget():
    cfg = SLAConfig(
        tasks={"a": 2}, rank=4, paths=("lora",), gate_unit="rank", budget=0.02, decision="magnitude",
        dense_fraction=0.5, search_fraction=0.0,
    )  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=2).train()
    big = set()
    with torch.no_grad():  # after a dense phase: a few units moved far, the rest a little
        for site in model.site_modules:
            pool = site.sla_lora
            pool.up_weight.normal_(0, 1e-3)
            c = site.spec.candidates["lora"]
            if c % 3 == 0:
                pool.up_weight[:, 1].fill_(1.0)
                big.add((c, 1))
    ids, mask = batch()
    labels = torch.tensor([1, 0, 1, 0])
    model(input_ids=ids, attention_mask=mask, labels=labels)  # the dense phase: nothing decided yet
    assert not bool(model.sla_decided_flag) and model.phase() == "fixed"
    model(input_ids=ids, attention_mask=mask, labels=labels)  # the first fixed-structure forward decides
    decided = model.sla_decided[0]
    kept = {(int(c), int(k)) for c, k in decided.nonzero()}
    cost = float((decided * model.member_params).sum()) + model.parameter_counts()["heads"]
    budget = 0.02 * model.parameter_counts()["backbone"]
    assert cost <= budget and kept
    assert big <= kept and len(kept) > len(big)  # the units that moved far first, then the budget filled
    with pytest.raises(ValueError, match="dense phase"):
        SLAConfig(tasks={"a": 2}, budget=0.02, decision="magnitude")


def test_pruning_a_task_left_without_adapters_is_refused_unless_allowed():
    from sla_core.model import EmptyStructureError

    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2, "b": 2}, rank=2, lambda_sparse=3.0))
    with torch.no_grad():
        model.sla_gates.log_alpha[1] = -10.0  # every gate of task b closed
    assert model.empty_tasks() == ["b"]
    with pytest.raises(EmptyStructureError, match=r"task\(s\) \['b'\] .*lambda_sparse=3.0.*allow_empty"):
        model.prune()
    assert model.prune(allow_empty=True).pruned


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


@pytest.mark.parametrize("kind", KINDS)
def test_lora_type_candidates_sit_on_every_projection_train_and_prune_exactly(kind):
    cfg = SLAConfig(tasks={"a": 2}, rank=2, paths=("lora",), head_dropout=0.0)
    model = attach(tiny_backbone(kind), cfg)
    names = model.candidate_names()
    assert all(n.endswith(".lora") for n in names)
    per_layer = {"bert": 6, "gpt2": 4, "llama": 7}[kind]  # q k v o ffn-in ffn-out (+ gate; GPT-2: fused qkv)
    assert len(names) == 2 * per_layer
    pools = [pool for site in model.site_modules for _, pool in site.pools()]
    assert all(p.activation == "identity" and p.up_bias is None and p.down_bias is None for p in pools)
    _train(model, steps=4)
    with torch.no_grad():
        model.sla_gates.log_alpha[:, ::2] = -10.0
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        pruned = model.prune()
        after = pruned(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert 0 < pruned.parameter_counts()["adapters"] < model.parameter_counts()["adapters"]


def test_rank_units_gate_each_rank_of_an_adapter():
    cfg = SLAConfig(tasks={"a": 2}, rank=4, paths=("lora",), gate_unit="rank", budget=0.02, head_dropout=0.0)
    model = attach(tiny_backbone("bert"), cfg)
    assert model.sla_gates.log_alpha.shape == (1, 12, 4)  # 12 candidates x 4 rank-1 units
    assert model.member_params[0, 0] == 32 + 32  # one unit: a row of A and a column of B
    whole = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, paths=("lora",)))
    assert whole.parameter_counts()["adapters"] == model.parameter_counts()["adapters"]
    decided = model.decided_gates()
    kept = float((decided[0] * model.member_params).sum()) + model.parameter_counts()["heads"]
    budget = 0.02 * model.parameter_counts()["backbone"]
    assert budget - 64 <= kept <= budget  # filled to within one unit


@pytest.mark.parametrize("kind", KINDS)
def test_merge_folds_lora_units_into_the_weights_exactly(kind):
    cfg = SLAConfig(tasks={"a": 2}, rank=2, paths=("parallel", "lora"), head_dropout=0.0)
    model = attach(tiny_backbone(kind), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_weight" in name:
                p.normal_(0, 0.2)  # trained-looking units, so that a wrong fold would show
        model.sla_gates.log_alpha[:, ::3] = -10.0
    model.eval()
    ids, mask = batch()
    pruned = model.prune()
    with torch.no_grad():
        before = pruned(input_ids=ids, attention_mask=mask).logits
        merged = pruned.merge()
        after = merged(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert all(site.sla_lora is None for site in merged.site_modules)
    with pytest.raises(ValueError, match="merged into the backbone"):
        merged.save_adapters("/tmp/never")
    lora_only = attach(tiny_backbone(kind), SLAConfig(tasks={"a": 2}, rank=2, paths=("lora",))).eval()
    bare = lora_only.prune().merge()
    assert bare.site_modules == [] and not any(isinstance(m, SLASite) for m in bare.backbone.modules())


def test_a_decided_structure_skips_the_closed_pools_and_changes_no_logit():
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=2, paths=("parallel", "lora")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_weight" in name:
                p.normal_(0, 0.2)
        model.sla_gates.log_alpha[:, ::2] = -10.0  # half the candidates closed
    model.eval()
    ran: list[int] = []
    for site in model.site_modules:
        for path, pool in site.pools():
            c = site.spec.candidates[path]
            pool.register_forward_hook(lambda *_, c=c: ran.append(c))
    ids, mask = batch()
    with torch.no_grad():
        skipped = model(input_ids=ids, attention_mask=mask).logits
    open_candidates = sorted(int(c) for c in (model.decided_gates()[0].amax(dim=1) > 0).nonzero())
    assert sorted(ran) == open_candidates and 0 < len(ran) < model.num_candidates
    every = model.context.runs
    model.context.runs = lambda c, pool: True  # the same forward with every pool run
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.context.runs = every
    assert torch.equal(skipped, full)


@pytest.mark.parametrize("paths, budget", [(("lora",), 0.05), (("sequential", "parallel"), 0.02)])
def test_compact_keeps_the_forward_and_the_saved_shapes_and_drops_the_closed_units(paths, budget):
    cfg = SLAConfig(tasks={"a": 2, "b": 3}, rank=2, paths=paths, gate_unit="rank", budget=budget,
                    search_fraction=0.5, head_dropout=0.0, dropout=0.0)  # fmt: skip
    model = attach(tiny_backbone("bert"), cfg, schedule_steps=4).train()
    ids, mask = batch()
    task_ids, labels = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 2, 0, 1])
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels)  # the search
        for pool in (p for s in model.site_modules for _, p in s.pools()):
            for w in pool.parameters():  # every unit moves the output, so a wrong unit would show
                w.copy_(torch.randn_like(w) * 0.1)
    assert model.phase() == "fixed" and not model.compacted
    counts = model.parameter_counts()
    torch.manual_seed(0)  # the backbone's dropout: the same draws in both training forwards
    before_train = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    model.eval()
    with torch.no_grad():
        before_eval = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    model.train()
    full_state = {k: v.clone() for k, v in model.state_dict().items() if "sla_" in k}  # decided now

    moved = model.compact()
    assert model.compacted and moved
    kept = (model.sla_decided > 0).any(dim=0)  # (C, K): kept by some task
    held = sum(p.numel() for n, p in model.named_parameters() if "sla_" in n and "down_weight" in n)
    assert 0 < held < sum(v.numel() for k, v in full_state.items() if k.endswith("down_weight"))
    rows = sum(
        int(kept[s.spec.candidates[path]].sum()) * p.in_dim
        for s in model.site_modules
        for path, p in s.pools()
    )
    assert held == rows  # one down row per kept rank-1 unit
    assert model.parameter_counts() == counts  # what was trained still counts as trained
    torch.manual_seed(0)
    after = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.allclose(before_train, after, atol=1e-5)
    model.eval()
    with torch.no_grad():
        now = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.allclose(before_eval, now, atol=1e-5)
    saved = {k: v for k, v in model.state_dict().items() if "sla_" in k}
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in full_state.items()}
    assert all(torch.equal(saved[k], full_state[k]) for k in saved)  # the dropped units as they were
    with torch.no_grad():
        for pool in (p for s in model.site_modules for _, p in s.pools()):
            pool.up_weight.zero_()  # the kept units' own weights change; the dropped units' record does not
    zeroed = {k: v for k, v in model.state_dict().items() if "sla_" in k}
    assert not all(torch.equal(zeroed[k], full_state[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in zeroed.items() if k.endswith("up_weight"))
    model.load_state_dict(full_state, strict=False)  # a full-shape state loads into the compacted pools
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.allclose(before_eval, again, atol=1e-5)
    with pytest.raises(RuntimeError, match="already compacted"):
        model.compact()
