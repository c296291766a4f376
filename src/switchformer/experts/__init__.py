"""Experts: stacked expert FFN weights and the local token dispatcher."""
