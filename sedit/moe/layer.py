"""Single-process expert-choice MoE feed-forward: route -> dispatch -> experts -> combine."""

from __future__ import annotations

import torch
from torch import nn

from sedit.moe.dispatch import combine, dispatch
from sedit.moe.experts import GroupedExperts
from sedit.moe.routing import ExpertChoiceRouter, Routing


class ExpertChoiceMoE(nn.Module):
    """out_t = sum_e g_{t,e} * expert_e(x_t) over the experts e that chose token t."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float, gated: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.router = ExpertChoiceRouter(dim, num_experts, capacity)
        self.experts = GroupedExperts(num_experts, dim, hidden, gated)
        # the routing of the latest forward, for statistics; kept always: a flag read in the forward would
        # make a compiled model recompile whenever statistics are switched on or off
        self.last_routing: Routing | None = None

    def run_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Expert compute on the expert-major layout (E, M, D); the expert-parallel layer overrides it."""
        return self.experts(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)  # gates/index (N, E, C)
        self.last_routing = Routing(*(t.detach() for t in routing))  # statistics only: no autograd graph kept
        tokens = dispatch(x, routing.token_index)  # (E, N*C, D)
        out = self.run_experts(tokens)  # (E, N*C, D)
        return combine(out, routing.gates, routing.token_index, x.shape[1])  # (N, T, D)
