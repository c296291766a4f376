from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import ClassVar

import pytest

from switchformer.experiments.plan import SHORT_NAMES, ComparePlan, RunKind
from switchformer.experiments.results import RunResult
from switchformer.experiments.speedup import Curve

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_corpus(path: Path, modules: tuple[str, ...] = ("json", "email", "logging", "http")) -> Path:
    """A small real corpus: a few standard-library packages' sources in one text file."""
    texts = [p.read_text(encoding="utf-8") for m in modules for p in sorted((STDLIB / m).glob("*.py"))]
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def tiny_plan(**changes) -> ComparePlan:
    """Two layers of width 32 and a handful of steps: plumbing, not results; one run at a time (side by side has
    its own tests: a process per run costs a torch import)."""
    shape = {"model.d_model": 32, "model.d_ff": 64, "model.num_layers": 2, "model.num_heads": 2}
    data = {"data.vocab_size": 512, "data.sequence_length": 32, "data.batch_size": 4, "data.validation_batches": 2}
    train = {"train.steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3, "train.warmup_steps": 2}
    sweep = {
        "sweep.expert_counts": (2, 4),
        "sweep.capacity_factors": (1.0,),
        "sweep.capacity_experts": 4,
        "sweep.top2_experts": 4,
    }
    base = ComparePlan().replace(**shape, **data, **train, **sweep, parallel_runs=1)
    return base.replace(**changes)


def legacy_plan_record(plan: ComparePlan) -> dict:
    """``plan`` as compare.json held it before the plan had sections: every field flat, by its short name."""
    nested = plan.to_dict()

    def at(path: str):
        value = nested
        for name in path.split("."):
            value = value[name]
        return value

    return {name: at(path) for name, path in SHORT_NAMES.items()} | {
        "parallel_runs": plan.parallel_runs,
        "only": list(plan.only),
    }


class BarDrawnHere:
    """Stands in for tqdm (a bar factory): what it was asked to draw."""

    drawn: ClassVar[list[BarDrawnHere]] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.steps, self.postfix, self.closed = kwargs, 0, None, False
        self.drawn.append(self)

    def set_postfix(self, postfix, refresh=True) -> None:
        self.postfix = postfix

    def update(self, steps) -> None:
        self.steps += steps

    def close(self) -> None:
        self.closed = True

    @classmethod
    def write(cls, text, file=None, end="\n", nolock=False) -> None:
        print(text, file=file, end=end)


SYNTHETIC_STEPS = (100, 200, 300, 400)


def synthetic_run(
    name: str, kind: RunKind, losses: tuple[float, ...], *, seed: int = 0, experts: int = 1, factor: float = 1.25
) -> RunResult:
    """A run's record with a given validation curve at steps 100-400 (a second of training per 10 steps)."""
    seconds = tuple(s / 10 for s in SYNTHETIC_STEPS)
    return RunResult(
        name=name,
        kind=kind,
        seed=seed,
        num_experts=experts,
        capacity_factor=None if experts == 1 else factor,
        top_k=1,
        curve=Curve(SYNTHETIC_STEPS, seconds, losses),
        steps=SYNTHETIC_STEPS[-1],
        train_seconds=seconds[-1],
        tokens_per_second=1.0,
        params_total=1,
        params_active=1,
        load={},
        dropped_fraction=None,
        load_average=None,
        folder=Path(name),
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs fix ``torch.set_num_threads``; give the rest of the test session its setting back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
