"""Models: the T5-style encoder-decoder and decoder-only LM, their configs, outputs and size counts."""
