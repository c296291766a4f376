from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.runs import STEPS, run_to_completion, train_args


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The uninterrupted run the killed ones must reproduce, made once per model type and length."""
    made: dict[tuple[str, int], Path] = {}

    def get(model_type: str = "encoder-decoder", steps: int = STEPS) -> Path:
        if (model_type, steps) not in made:
            work = tmp_path_factory.mktemp(f"reference-{model_type}-{steps}")
            run_to_completion(train_args(work / "run", model_type=model_type, steps=steps), work, name="reference")
            made[model_type, steps] = work / "run"
        return made[model_type, steps]

    return get
