"""Training: config, optimizers and schedules, the loop, checkpoints, metrics and progress."""
