"""Print the headline figures of a run folder's metrics.jsonl: every 50th step and every evaluation.

python bench/show_metrics.py RUN_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from switchformer.training.metrics import read_metrics

FIELDS = ("step", "loss", "val_loss", "tokens_per_second", "dropped_fraction", "elapsed_seconds")

if __name__ == "__main__":
    for record in read_metrics(Path(sys.argv[1])):
        if record["step"] % 50 == 0 or "val_loss" in record:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items() if k in FIELDS})
