"""Layers: norm, attention, relative position bias, dense FFN and the Switch FFN."""
