"""The Switch layer in one package: config, router, assignment (capacity, groups, priority), auxiliary losses,
stacked experts, token dispatch and the layer itself.

Data flow of one :class:`SwitchFFN` call: :class:`Router` logits -> :func:`route` (a :class:`Routing` record:
expert index, gate, keep mask, slot) -> a :class:`TokenDispatcher` gathers kept tokens into expert rows ->
:class:`GroupedExperts` -> the dispatcher combines the rows back, weighted by the gate. Losses and statistics are
pure functions of the :class:`Routing` record (:mod:`switchformer.moe.losses`).
"""

from switchformer.moe.assignment import Routing, route
from switchformer.moe.config import ExpertKernel, Gate, Grouping, MoEConfig, OverflowPolicy, RoutingPriority
from switchformer.moe.dispatch import LocalDispatcher, TokenDispatcher
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout
from switchformer.moe.layer import MoEOutput, SwitchFFN, SwitchFFNConfig
from switchformer.moe.losses import RouterStats, load_balancing_loss, router_stats, router_z_loss
from switchformer.moe.router import Router

__all__ = [
    "ExpertBatch",
    "ExpertKernel",
    "Gate",
    "GroupedExperts",
    "Grouping",
    "Layout",
    "LocalDispatcher",
    "MoEConfig",
    "MoEOutput",
    "OverflowPolicy",
    "Router",
    "RouterStats",
    "Routing",
    "RoutingPriority",
    "SwitchFFN",
    "SwitchFFNConfig",
    "TokenDispatcher",
    "load_balancing_loss",
    "route",
    "router_stats",
    "router_z_loss",
]
