"""The search space: the rule plan is one of its points, and every sampled plan keeps the budget."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoseg.data.synth import make_dataset
from autoseg.errors import ConfigError, PlanningError
from autoseg.fingerprint import extract_fingerprint
from autoseg.networks import list_blocks
from autoseg.planning import default
from autoseg.planning.memory import estimate_flops
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans
from autoseg.search import suggest
from autoseg.search.space import (
    build_candidate,
    limits_for,
    rule_params,
    sample_candidate,
    search_space,
    trainable_configurations,
)


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Plans:
    root = tmp_path_factory.mktemp("space")
    data = make_dataset(root / "data", "ct3d", cases=4, test_cases=0, seed=3)
    fp = extract_fingerprint(data, root / "fingerprint.json", workers=1)
    return make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, overrides=["training.epochs=8"])


def test_rule_params_give_back_the_rule_configuration(plans):
    for name in trainable_configurations(plans):
        out = suggest(optuna.trial.FixedTrial(rule_params(plans, name)), plans)
        assert list(out.configurations) == [name]
        assert out.configurations[name] == plans.configurations[name]
        fixed = suggest(optuna.trial.FixedTrial(rule_params(plans, name)), plans, name)
        assert fixed.configurations[name] == plans.configurations[name]


def test_rule_params_lie_inside_the_space(plans):
    names = trainable_configurations(plans)
    space = search_space(plans, names)
    assert space[0].name == "configuration" and space[0].choices == names
    assert "configuration" not in [p.name for p in search_space(plans, names[:1])]
    for name in names:
        params = rule_params(plans, name)
        for p in space:
            if p.kind == "categorical":
                assert params[p.name] in p.choices
            else:
                assert p.low <= params[p.name] <= p.high


def test_throughput_is_read_from_the_plan(plans):
    limits = limits_for(plans)
    assert limits.knows_speed and limits.budget.flops_per_second == pytest.approx(5e7)
    assert plans.device.flops_per_second == pytest.approx(5e7)  # a typed field, not prose in ``why``
    assert limits_for(dataclasses.replace(plans, why=())).knows_speed
    bare = dataclasses.replace(plans, device=dataclasses.replace(plans.device, flops_per_second=None))
    assert not limits_for(bare).knows_speed
    assert limits_for(bare, 2e9).budget.flops_per_second == 2e9


space_draw = st.fixed_dictionaries(
    {
        "configuration": st.sampled_from(["3d_fullres", "2d"]),
        "patch_scale": st.floats(0.5, 2.0),
        "depth_delta": st.sampled_from([-2, -1, 0]),
        "width_scale": st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0]),
        "block": st.sampled_from(["plain", "residual"]),
        "epochs_scale": st.floats(0.5, 2.0),
        "oversampling": st.floats(0.0, 1.0),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=space_draw)
def test_candidates_keep_memory_time_and_compute_budgets(plans, drawn):
    name = drawn["configuration"]
    rule = plans.configurations[name]
    limits = limits_for(plans)
    try:
        cand = build_candidate(plans, {**rule_params(plans, name), **drawn}, limits=limits)
    except PlanningError as exc:
        assert "no patch" in str(exc)
        return
    c = cand.configuration
    assert limits.budget.memory(c.network, c.patch_size, c.batch_size) <= limits.budget.memory_limit()
    assert limits.budget.seconds(c.network, c.patch_size, c.batch_size) <= default.CPU_SECONDS_PER_ITERATION[c.ndim]
    assert all(p % d == 0 for p, d in zip(c.patch_size, c.network.total_stride))
    assert c.network.n_stages >= 2 and len(c.patch_size) == rule.ndim
    assert c.data_identifier == rule.data_identifier and c.spacing == rule.spacing  # no new preprocessing
    flops = estimate_flops(c.network, 1, plans.n_outputs, c.patch_size, c.batch_size)
    rule_flops = estimate_flops(rule.network, 1, plans.n_outputs, rule.patch_size, rule.batch_size)
    assert cand.epochs_scale <= drawn["epochs_scale"] + 1e-9
    assert cand.epochs_scale * flops <= rule_flops * 1.000001  # never more compute than the rule plan
    assert c.foreground_oversampling == drawn["oversampling"]


def test_a_budget_nothing_fits_raises(plans):
    tiny = dataclasses.replace(plans, device=dataclasses.replace(plans.device, memory_bytes=2**10))
    params = {**rule_params(plans, "3d_fullres"), "width_scale": 2.0}
    with pytest.raises(PlanningError, match="no patch of 3d_fullres fits.*family 'plain' excluded"):
        build_candidate(tiny, params, limits=limits_for(tiny))


def test_patch_batch_trade_off_and_changed_fields(plans):
    rule = plans.configurations["2d"]
    params = {
        **rule_params(plans, "2d"),
        "patch_scale": 0.5,
        "loss": "tversky",
        "learning_rate": 0.03,
        "aug_strength": 0.5,
    }
    cand = sample_candidate(optuna.trial.FixedTrial(params), plans, "2d")
    c = cand.configuration
    assert c.batch_size >= rule.batch_size * 2 - 1  # half the patch volume, about twice the batch
    assert c.loss.name == "tversky" and c.training.learning_rate == 0.03 and c.augmentation.strength == 0.5
    assert cand.effective["patch_size"] == list(c.patch_size)


def test_unknown_configuration_is_named(plans):
    with pytest.raises(ConfigError, match="3d_cascade"):
        build_candidate(plans, {**rule_params(plans, "2d"), "configuration": "3d_cascade"})


def test_training_length_is_capped_by_the_priced_step(plans):
    rule = plans.configurations["3d_fullres"]

    def price(net, patch, batch):  # a step of the candidate costs three times the rule's
        return 1.0 if (net, tuple(patch), batch) == (rule.network, rule.patch_size, rule.batch_size) else 3.0

    params = {**rule_params(plans, "3d_fullres"), "width_scale": 0.75, "epochs_scale": 2.0}
    cand = build_candidate(plans, params, step_cost=price)
    assert cand.epochs_scale == pytest.approx(1 / 3)
    assert cand.configuration.training.epochs == round(rule.training.epochs / 3)
    assert cand.effective["step_cost_ratio"] == 3.0
    same = build_candidate(plans, {**rule_params(plans, "3d_fullres"), "epochs_scale": 2.0}, step_cost=price)
    assert same.epochs_scale == 1.0  # the rule plan already spends the whole budget


def test_every_registered_family_is_a_search_dimension(plans):
    block = next(p for p in search_space(plans) if p.name == "block")
    assert set(block.choices) == set(list_blocks()) and block.choices[:2] == ("plain", "residual")


@pytest.mark.parametrize("family", ["attention", "hybrid"])
def test_a_family_too_wide_for_the_budget_is_repaired_with_fewer_features(plans, family):
    rule = plans.configurations["2d"]
    params = {**rule_params(plans, "2d"), "block": family, "patch_scale": 0.999}
    fast = limits_for(plans, 1e15)  # only memory binds
    wanted = build_candidate(plans, params, limits=fast).configuration
    need = fast.budget.memory(wanted.network, wanted.patch_size, 1)
    tight = dataclasses.replace(plans, device=dataclasses.replace(plans.device, memory_bytes=int(2 * need * 0.98)))
    cand = build_candidate(tight, params, limits=limits_for(tight, 1e15))
    c = cand.configuration
    assert c.network.block == family and c.patch_size == wanted.patch_size
    assert max(c.network.features_per_stage) < max(wanted.network.features_per_stage)
    assert any(f"search: {family} features x0.75" in why for why in c.why)
    assert limits_for(tight, 1e15).fits(c.network, c.patch_size, 1)
    if family == "hybrid":
        assert c.network.bottleneck_tokens == tuple(p // s for p, s in zip(c.patch_size, c.network.total_stride))
    assert rule.why == plans.configurations["2d"].why  # the rule plan is untouched
