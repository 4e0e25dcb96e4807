"""The experiment config: the typed `sla:` section and the one override path (`with_overrides`, `--set`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sla_core.config import SLAConfig
from sla_core.experiment import (
    ExperimentConfig,
    ExperimentConfigError,
    SLASection,
    load_experiment,
    parse_overrides,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
PIPELINE = ROOT / "configs" / "pipeline.yaml"  # three tasks


def load(path: Path, *sets: str) -> ExperimentConfig:
    return load_experiment(path, parse_overrides(list(sets)))


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (["sla.rnk=4"], r"--set sla\.rnk: unknown key 'rnk' in section sla; known: rank, pool_size"),
        (["sla.lambda_sparse=abc"], r"sla\.lambda_sparse: Input should be a valid number.*got 'abc'"),
        (["sla.gate=nope"], r"sla\.gate: unknown gate kind 'nope'; choose one of .*hard_concrete"),
        (["sla.rank=0"], r"sla\.rank: Input should be greater than or equal to 1, got 0"),
        (["sla.activation=swish"], r"sla\.activation: unknown activation 'swish'"),
        (["tasks.3.max_length=128"], r"--set tasks\.3\.max_length: the config has 3 tasks \(0\.\.2\)"),
        (["tasks.x.max_length=128"], r"--set tasks\.x\.max_length: the config has 3 tasks"),
        (
            ["tasks.0.max_length=2"],
            r"tasks\.0\.max_length: Input should be greater than or equal to 4, got 2\b",
        ),
        (["train.steps.x=1"], r"--set train\.steps\.x: train\.steps is a value, not a section"),
        (["nope=1"], r"--set nope: unknown key 'nope' at the top level"),
    ],
)
def test_bad_overrides_name_the_file_and_the_key(sets: list[str], named: str) -> None:
    with pytest.raises(ExperimentConfigError, match=named) as info:
        load(PIPELINE, *sets)
    assert str(info.value).startswith(f"{PIPELINE}: invalid config")


def test_every_bad_key_and_value_is_reported_at_once() -> None:
    with pytest.raises(ExperimentConfigError) as info:
        load(TINY, "sla.rnk=4", "train.lr=x", "tasks.1.max_length=64")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "--set sla.rnk",
        "--set tasks.1.max_length",
        "train.lr",
    ]


def test_unknown_keys_in_the_yaml_list_the_known_ones(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["sla"]["rnk"] = 4
    data["tasks"][0]["max_len"] = 64
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ExperimentConfigError) as info:
        load_experiment(tmp_path / "bad.yaml")
    problems = "\n".join(info.value.problems)
    assert "sla.rnk: unknown key; known keys are rank, pool_size" in problems
    assert "tasks.0.max_len: unknown key; known keys are name, source" in problems
    data["sla"] = {"tasks": {"a": 2}}
    with pytest.raises(ExperimentConfigError, match="derived from the top-level `tasks:`"):
        with_overrides({**data, "tasks": [{"name": "rotten_tomatoes"}]}, {})


def test_list_items_are_reachable() -> None:
    cfg = load(PIPELINE, "tasks.1.max_length=128", "tasks.2.eval_noise_levels=[0.0, 0.3]")
    assert [t.max_length for t in cfg.tasks] == [64, 128, 64]
    assert cfg.tasks[2].eval_noise_levels == [0.0, 0.3]
    hub = load(TINY, "tasks.0.source=local", "tasks.0.files.train=x.csv", "tasks.0.labels=[a, b]")
    assert str(hub.tasks[0].files.train) == "x.csv" and hub.tasks[0].labels == ["a", "b"]
    extra = load(TINY, "tune.extra_space.train.gate_lr=[0.01, 0.05]")  # a mapping's keys keep their dots
    assert extra.tune.extra_space == {"train.gate_lr": [0.01, 0.05]}


def test_the_search_space_and_set_give_the_same_config() -> None:
    from tuning.space import apply_overrides

    point = {"sla.rank": 16, "sla.lambda_sparse": 0.5, "train.lr": 2e-3, "tasks.0.max_length": 48}
    via_set = load(TINY, *(f"{k}={v}" for k, v in point.items()))
    via_search = apply_overrides(load(TINY), point)
    assert via_search == via_set == with_overrides(load(TINY), point)
    assert via_set.sla_config().rank == 16 and via_set.tasks[0].max_length == 48
    # only keys set in the YAML or by an override count as set (what a trial's config.yaml holds)
    assert via_set.model_dump(exclude_unset=True)["sla"] == {"rank": 16, "lambda_sparse": 0.5}


def test_the_sla_section_mirrors_slaconfig() -> None:
    fields = {f.name: f for f in dataclasses.fields(SLAConfig) if f.name != "tasks"}
    assert list(SLASection.model_fields) == list(fields)
    section = SLASection(lambda_sparse=1.0)  # λ mode: the mode is the one default that differs
    runtime = SLAConfig(tasks={"a": 2})
    for name in fields:
        assert getattr(section, name) == getattr(runtime, name), name
    cfg = load(TINY, "sla.paths=[parallel]", "sla.target_modules=[query, value]", "sla.budget=0.02")
    built = cfg.sla_config({"rotten_tomatoes": 2})
    assert (
        built.paths == ("parallel",) and built.target_modules == ["query", "value"] and built.budget == 0.02
    )
    assert cfg.sla_config(rank=4).rank == 4


def test_parse_overrides_reads_yaml_values_and_refuses_a_missing_equals() -> None:
    assert parse_overrides(["a.b=[1, 2]", "c=null", "d="]) == {"a.b": [1, 2], "c": None, "d": ""}
    with pytest.raises(ValueError, match="--set 'train.steps': expected KEY=VALUE"):
        parse_overrides(["train.steps"])


def test_the_resolved_dump_builds_the_same_model_where_the_plain_dump_would_not() -> None:
    """A config written back (the pipeline's exported YAML, a benchmark cell) must train what ran: the plain
    dump spells out the section's unset defaults, which the budget recipe replaces."""
    plain = with_overrides({"tasks": [{"name": "rotten_tomatoes"}], "sla": {"rank": 4}}, {})
    again = with_overrides(plain.resolved_dump(), {})
    assert again.sla_config() == plain.sla_config() and again.sla_config().paths == ("lora",)
    assert with_overrides(plain.model_dump(mode="json"), {}).sla_config().paths == ("sequential", "parallel")
    assert plain.resolved_sla()["paths"] == ["lora"] and "lambda_sparse" not in plain.resolved_sla()
    # a method's own option (here λ mode) is part of what ran, and the dump written back keeps it
    lam = with_overrides(plain, {"method": "sla:lambda_sparse=0.5"})
    back = with_overrides(lam.resolved_dump(), {})
    ran = lam.training_method().sla_config({"rotten_tomatoes": 2}, lam)
    assert back.training_method().sla_config({"rotten_tomatoes": 2}, back) == ran and ran.lambda_sparse == 0.5


def test_a_config_that_names_no_size_gets_the_budget_recipe_and_lambda_stays_available() -> None:
    from sla_core.experiment import DEFAULT_RECIPE
    from sla_core.methods import parse_method

    plain = with_overrides({"tasks": [{"name": "rotten_tomatoes"}], "sla": {"rank": 4}}, {})
    built = plain.sla_config()
    assert plain.sla.budget_mode and built.budget == DEFAULT_RECIPE["budget"]
    assert (built.paths, built.gate_unit, built.gate, built.search_fraction) == (
        ("lora",),
        "rank",
        "sensitivity",
        0.5,
    )
    assert built.rank == 4  # what the section sets wins
    # a budget of one's own keeps the recipe's schedule; λ (by --set or a method option) is λ mode
    own = with_overrides(plain, {"sla.budget": 0.01}).sla_config()
    assert (own.budget, own.gate_unit) == (0.01, "rank")
    lam = with_overrides(plain, {"sla.lambda_sparse": 0.5})
    assert not lam.sla.budget_mode
    assert (lam.sla_config().budget, lam.sla_config().lambda_sparse) == (None, 0.5)
    assert lam.sla_config().paths == ("sequential", "parallel") and lam.sla_config().search_fraction == 1.0
    option = parse_method("sla:lambda_sparse=0.5").sla_config({"rotten_tomatoes": 2}, plain)
    assert (option.budget, option.lambda_sparse) == (None, 0.5)
    # a λ config switched to a budget by --set; the fixed adapters baseline never gets a budget
    assert load(TINY, "sla.budget=0.02").sla_config().budget == 0.02
    assert parse_method("adapters").sla_config({"rotten_tomatoes": 2}, plain).budget is None
    data = plain.model_dump(exclude_unset=True) | {"sla": {"budget": 0.01, "lambda_sparse": 1}}
    both = with_overrides(data, {})
    assert both.sla.budget_mode and both.sla_config().gate_unit == "module"  # as before: no recipe, λ unused
