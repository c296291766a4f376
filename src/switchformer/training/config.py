"""Configuration of a training run."""

from __future__ import annotations

import dataclasses
import enum

from switchformer.config import Config


class OptimizerKind(enum.Enum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"  # the paper's optimizer (torch.optim.Adafactor)


class Schedule(enum.Enum):
    INVERSE_SQRT = "inverse-sqrt"  # T5: constant through warmup, then 1/sqrt(step)
    COSINE = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    CONSTANT = "constant"  # linear warmup, then constant


class Precision(enum.Enum):
    AUTO = "auto"  # bf16 autocast on CUDA, float32 on CPU (where bf16 pays only with bf16 instructions)
    FP32 = "fp32"
    BF16 = "bf16"  # autocast to bfloat16; the router stays float32 (selective precision)


class NonFinitePolicy(enum.Enum):
    STOP = "stop"  # raise with a message naming the first layer whose gradient is not finite
    SKIP = "skip"  # drop the step (no update) and continue; stop after max_skipped_steps in a row


@dataclasses.dataclass
class TrainConfig(Config):
    steps: int = 1000
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many micro-batches
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Schedule = Schedule.INVERSE_SQRT
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor
    clip_grad_norm: float | None = 1.0
    precision: Precision = Precision.AUTO
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None  # None = all validation batches
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # under torchrun: write checkpoints in the background while training goes on
    non_finite: NonFinitePolicy = NonFinitePolicy.STOP
    max_skipped_steps: int = 10
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    # The loss straight from the output layer's input, a block of rows at a time (layers.linear_cross_entropy):
    # no [tokens, vocab] logits in memory (1.5 GB -> 0.4 GB for 4096 tokens on T5's 32k vocabulary).
    chunked_loss: bool = False
    # Recompute every N-th block's activations in the backward pass (1 = every block; 0 leaves the model as built,
    # off unless set on it): activation memory for about one more forward pass (models.stack).
    activation_checkpointing: int = 0
    # torch.compile every transformer block with this backend (training.compiled): None = eager, "inductor" for
    # fused kernels (one-time compile cost; on CPU a C++ compiler), "aot_eager" to check that the model traces.
    compile: str | None = None
    collapse_warning_share: float = 0.5  # warn when one expert takes this share of a layer's tokens ...
    collapse_warning_steps: int = 50  # ... for this many logged steps in a row (router collapse)

    def validate(self) -> None:
        self.check(self.steps >= 1, "steps", "must be >= 1")
        self.check(self.micro_batches >= 1, "micro_batches", "must be >= 1")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)"
        )
        self.check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self.check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm", "must be None or > 0")
        self.check(self.log_every >= 1, "log_every", "must be >= 1")
        self.check(self.eval_every >= 1, "eval_every", "must be >= 1")
        self.check(self.eval_batches is None or self.eval_batches >= 1, "eval_batches", "must be None or >= 1")
        self.check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        self.check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        self.check(self.max_skipped_steps >= 1, "max_skipped_steps", "must be >= 1")
        self.check(self.threads is None or self.threads >= 1, "threads", "must be None or >= 1")
        self.check(
            self.activation_checkpointing >= 0, "activation_checkpointing", "must be >= 0 (0 = off, 1 = every block)"
        )
        self.check(0 < self.collapse_warning_share <= 1, "collapse_warning_share", "must be in (0, 1]")
        self.check(self.collapse_warning_steps >= 1, "collapse_warning_steps", "must be >= 1")
        self.check(
            self.device in ("auto", "cpu") or self.device.startswith(("cuda", "mps")),
            "device",
            "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
        )
