"""Layers: norm, attention, relative position bias, KV cache, dense FFN, activations and initialisation."""
