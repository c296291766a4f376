"""Label conventions shared by the data pipeline, the models' losses and distillation."""

IGNORE_INDEX = -100  # a label no loss counts (padding, the encoder side of a batch): PyTorch's and HF's convention
