"""``switchformer plan``: the per-rank figures of the real sharding code on a fake process group, against a real
4-process run and against the arithmetic of the paper's models."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from switchformer import build_model, get_preset
from switchformer.cli.main import main
from switchformer.config import ConfigError
from switchformer.models.config import ModelConfig
from switchformer.parallel.mesh import ParallelDims
from switchformer.parallel.plan import Workload, plan_layout
from tests.parallel.launcher import run_and_check

TINY = ["d_model=32", "d_ff=64", "num_layers=2", "num_heads=2", "moe.num_experts=4", "vocab_size=128"]


def _tiny() -> ModelConfig:
    return get_preset("switch-tiny-8").with_overrides(TINY)


def real_rank_figures(dp_shard: int, ep: int) -> dict[str, Any]:
    """On each rank of a real gloo run: the parameters and AdamW state this rank holds after one step."""
    from switchformer.models.factory import build_model
    from switchformer.parallel import ParallelDims, apply_expert_parallel, apply_fsdp, init_parallel, materialize

    layout = init_parallel(ParallelDims(dp_shard=dp_shard, expert_parallel=ep))
    model = build_model(_tiny(), device="meta")
    apply_expert_parallel(model, layout)
    apply_fsdp(model, layout)
    materialize(model, layout.device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(2, 128, (2, 16))
    model(ids, labels=torch.randint(2, 128, (2, 4))).loss.backward()
    optimizer.step()
    local = [p.to_local() for p in model.parameters()]
    state = [t.to_local() for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    return {"params": sum(t.numel() for t in local), "optimizer": sum(t.numel() for t in state)}


@pytest.mark.parametrize(("dp_shard", "ep"), [(2, 2), (4, 1), (1, 4)])
def test_the_plan_matches_what_a_real_4_rank_run_holds(dp_shard, ep):
    ranks = run_and_check(real_rank_figures, 4, timeout_s=240, dp_shard=dp_shard, ep=ep)
    plan = plan_layout(_tiny(), ParallelDims(dp_shard=dp_shard, expert_parallel=ep), 4, Workload(batch_size=8))
    assert plan.params_per_rank == max(r["params"] for r in ranks) == ranks[0]["params"]  # rank 0 is the busiest
    assert plan.optimizer_bytes == 4 * ranks[0]["optimizer"]  # two float32 moments per weight
    assert plan.bytes_per_rank == 16 * plan.params_per_rank
    total = sum(p.numel() for p in build_model(_tiny(), device="meta").parameters())
    assert sum(r["params"] for r in ranks) == total  # every weight held exactly once across the 4 ranks


# The arithmetic of ../shared/SCALE.md: one expert per layer S*p and the non-expert weights D, in parameters;
# a rank of an expert-parallel group of ep holds E/ep experts per layer, sharded over dp_shard, plus D / (ranks).
SCALE = {"switch-base-128": (56_600_000, 167_500_000), "switch-xxl-128": (3_020_000_000, 8_128_000_000)}


@pytest.mark.parametrize(
    ("preset", "world", "ep"), [("switch-base-128", 8, 8), ("switch-xxl-128", 128, 128), ("switch-xxl-128", 512, 128)]
)
def test_the_plan_for_the_papers_models_is_the_scale_arithmetic(preset, world, ep):
    expert, dense = SCALE[preset]
    config = get_preset(preset)
    shard = world // ep
    expected = config.moe.num_experts // ep * expert / shard + dense / world
    plan = plan_layout(config, ParallelDims(dp_shard=shard, expert_parallel=ep), world, Workload(batch_size=world))
    assert plan.params_per_rank == pytest.approx(expected, rel=0.01)
    # Sharding the dense weights too is what makes switch-xxl-128 fit: 178 GB a rank replicated, 49.3 GB sharded.
    if preset == "switch-xxl-128" and world == 128:
        assert plan.bytes_per_rank / 1e9 == pytest.approx(49.3, rel=0.01)


@pytest.mark.slow
def test_switch_c_2048_on_2048_ranks_from_the_command_line(capsys):
    assert main(["plan", "switch-c-2048", "--world-size", "2048", "--expert-parallel", "2048", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params_per_rank"] == pytest.approx(1571.3e9 / 2048, rel=0.10)
    assert plan["bytes_per_rank"] / 1e9 == pytest.approx(12.3, rel=0.02)  # SCALE.md: 12.3 GB a rank


def test_a_layout_that_cannot_work_is_refused_with_the_reason(capsys):
    with pytest.raises(ConfigError, match=r"does not divide the world size 6"):
        plan_layout(_tiny(), ParallelDims(dp_shard=4, expert_parallel=1), 6, Workload(batch_size=12))
    with pytest.raises(ConfigError, match=r"expert_parallel=8 is invalid: it must divide the layers' num_experts=4"):
        plan_layout(_tiny(), ParallelDims(dp_shard=1, expert_parallel=8), 8, Workload(batch_size=8))
    assert main(["plan", "switch-tiny-8", "--world-size", "4", "--batch-size", "6"]) == 2
    assert "batch_size=6 is invalid for 4 ranks" in capsys.readouterr().err
