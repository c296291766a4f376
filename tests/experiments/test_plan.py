"""The plan: which runs, with which configs; every run shares shape, data and seed; errors name the field."""

from __future__ import annotations

import pytest

from switchformer.config import ConfigError
from switchformer.experiments.plan import ComparePlan, RunKind, plan_runs
from switchformer.models.flops import flops_per_token

from .conftest import legacy_plan_record, tiny_plan


def test_default_plan_runs_and_flop_matching():
    runs = plan_runs(ComparePlan(), vocab_size=4096)
    names = [r.name for r in runs]
    assert names == [
        "dense-seed0",
        "dense-seed1",
        "switch-2",
        "switch-8",
        "switch-32",
        "switch-8-cf1",
        "switch-8-cf2",
        "top2-8",
    ]
    dense = runs[0].model
    for run in runs:
        assert run.model.replace(moe=None) == dense  # only the FFNs differ
        assert run.seed == (1 if run.name == "dense-seed1" else 0)
    top1 = [r for r in runs if r.kind is RunKind.SWITCH]
    # Top-1 Switch runs match the dense FLOPs per token up to the router (d_model * experts per sparse layer).
    for run in top1:
        extra = flops_per_token(run.model) - flops_per_token(dense)
        assert 0 < extra <= 2 * 2 * dense.d_model * run.num_experts
    top2 = next(r for r in runs if r.kind is RunKind.TOP2)
    assert top2.model.moe.top_k == 2 and flops_per_token(top2.model) > flops_per_token(dense) * 1.1
    assert {r.name: r.capacity_factor for r in top1}["switch-8-cf1"] == 1.0


def test_only_selects_runs_and_rejects_unknown_names():
    runs = plan_runs(ComparePlan(only=("dense-seed0", "switch-8")), vocab_size=4096)
    assert [r.name for r in runs] == ["dense-seed0", "switch-8"]
    with pytest.raises(ValueError, match="switch-7"):
        plan_runs(ComparePlan(only=("switch-7",)), vocab_size=4096)


def test_invalid_plans_name_the_field():
    with pytest.raises(ConfigError, match="expert_counts"):
        ComparePlan().replace(expert_counts=(1, 8))
    with pytest.raises(ConfigError, match=r"ComparePlan.sweep.dense_seeds=\(3,\) is invalid: .*train.seed=0"):
        ComparePlan().replace(dense_seeds=(3,), seed=0)
    with pytest.raises(ConfigError, match=r"ComparePlan.train.threads=None is invalid"):
        ComparePlan().replace(threads=None)
    assert ComparePlan().with_overrides(["d_model=64", "expert_counts=4,16"]).sweep.expert_counts == (4, 16)


def test_device_and_precision_reach_every_run_and_bad_devices_are_named():
    plan = ComparePlan().with_overrides(["device=cuda", "precision=bf16"])
    train = plan.train_config(seed=0)
    assert (train.device, train.precision.value) == ("cuda", "bf16")
    assert ComparePlan().train_config(seed=0).device == "cpu"  # the documented timings are CPU timings
    with pytest.raises(ConfigError, match="device"):
        ComparePlan().replace(device="tpu")
    with pytest.raises(ConfigError, match=r"train\.device='mps'"):  # the trainer's, but not for a comparison
        ComparePlan().replace(device="mps")


def test_gate_reaches_the_switch_runs_and_top2_keeps_its_renormalised_gates():
    for gate in ("straight-through", "probability"):
        runs = plan_runs(ComparePlan().with_overrides([f"gate={gate}"]), vocab_size=4096)
        assert {r.model.moe.gate.value for r in runs if r.kind is RunKind.SWITCH} == {gate}
        assert next(r for r in runs if r.kind is RunKind.TOP2).model.moe.gate.value == "probability"
    assert ComparePlan().routing.gate.value == "straight-through"  # the default, measured in docs/results/


def test_group_size_and_z_loss_reach_every_routed_run():
    runs = plan_runs(ComparePlan().with_overrides(["group_size=256", "z_loss_coef=1e-3"]), vocab_size=4096)
    routed = [r.model.moe for r in runs if r.model.moe is not None]
    assert {(moe.group_size, moe.z_loss_coef) for moe in routed} == {(256, 1e-3)}
    with pytest.raises(ConfigError, match="group_size"):
        ComparePlan().replace(group_size=0)
    with pytest.raises(ConfigError, match="z_loss_coef"):
        ComparePlan().replace(z_loss_coef=-1.0)


def test_short_names_stand_for_the_sections_fields_in_overrides_and_replace():
    by_path = ComparePlan().with_overrides(["model.d_model=64", "train.steps=9", "model.moe.gate=probability"])
    by_name = ComparePlan().with_overrides(["d_model=64", "steps=9", "gate=probability"])
    assert by_path == by_name == ComparePlan().replace(d_model=64, steps=9, **{"model.moe.gate": "probability"})
    assert (by_name.model.d_model, by_name.train.steps, by_name.routing.gate.value) == (64, 9, "probability")
    with pytest.raises(ConfigError, match="no field 'd_modle'"):
        ComparePlan().with_overrides(["d_modle=64"])
    with pytest.raises(ConfigError, match="names no field"):
        ComparePlan().replace(**{"modle.d_model": 64})


def test_fields_that_follow_others_are_set_from_them():
    plan = ComparePlan().replace(vocab_size=1024, seed=3, dense_seeds=(3,), architecture="encoder-decoder")
    assert (plan.model.vocab_size, plan.data.seed, plan.data.objective.value) == (1024, 3, "span-corruption")


def test_a_plan_saved_flat_by_earlier_versions_loads_into_the_same_plan():
    plan = tiny_plan().with_overrides(["gate=probability", "group_size=512", "seed=1", "dense_seeds=1", "lr=1e-3"])
    assert ComparePlan.from_saved(legacy_plan_record(plan)) == plan
    assert ComparePlan.from_saved(plan.to_dict()) == plan  # and the sectioned plan of this version
