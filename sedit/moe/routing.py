"""Expert-choice routing (Zhou et al. 2022), computed per image.

Each expert e ranks the T tokens of one image by its router probability and takes the top C of
them, C = capacity * T / E. A token may be taken by 0..E experts; every expert is exactly full,
so no auxiliary balancing loss is needed. Routing of image n only reads image n.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def expert_capacity(tokens: int, num_experts: int, capacity: float) -> int:
    """Tokens each expert takes from one image: C = capacity * T / E, at least 1, at most T."""
    return min(tokens, max(1, int(round(capacity * tokens / num_experts))))


class Routing(NamedTuple):
    gates: torch.Tensor  # (N, E, C) router probability of each chosen token
    token_index: torch.Tensor  # (N, E, C) which token of the image each expert slot holds
    probs: torch.Tensor  # (N, T, E) full router softmax, kept for load/entropy statistics


class ExpertChoiceRouter(nn.Module):
    """Linear router -> softmax over experts -> per-image top-C tokens for every expert."""

    def __init__(self, dim: int, num_experts: int, capacity: float):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.weight = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        n, t, _ = x.shape
        c = expert_capacity(t, self.num_experts, self.capacity)
        logits = self.weight(x).float()  # (N, T, E); routing decisions in fp32
        probs = logits.softmax(dim=-1)  # (N, T, E)
        gates, token_index = probs.transpose(1, 2).topk(c, dim=-1, sorted=False)  # (N, E, C)
        return Routing(gates, token_index, probs)


def tokens_chosen(routing: Routing) -> torch.Tensor:
    """(N, E, T) 0/1 mask: 1 where expert e took token t of image n (each (n, e, t) counted once)."""
    n, t, e = routing.probs.shape
    chosen = torch.zeros(n, e, t, device=routing.probs.device)
    return chosen.scatter_(2, routing.token_index, 1.0)  # (N, E, T)


@torch.no_grad()
def expert_load(routing: Routing) -> dict[str, torch.Tensor]:
    """Per-expert load of one routing decision, (E,) vectors:

    - ``tokens``: distinct tokens each expert took, summed over images (N * C by construction);
    - ``importance``: mean router probability of each expert over all tokens (sums to 1 over experts).
    """
    return {
        "tokens": tokens_chosen(routing).sum(dim=(0, 2)),  # (E,)
        "importance": routing.probs.mean(dim=(0, 1)),  # (E,)
    }


@torch.no_grad()
def routing_stats(routing: Routing) -> dict[str, torch.Tensor]:
    """Load statistics of one routing decision, as 0-d tensors (no host sync here).

    - ``router_entropy``: mean entropy of the per-token expert distribution (ln E = uniform);
    - ``dropped_fraction``: share of tokens that no expert took (they pass through the residual);
    - ``experts_per_token``: mean number of experts that took a token (= capacity by construction);
    - ``tokens_per_expert``: distinct tokens an expert took, summed over images, mean over experts
      (= N * C by construction: a lower value means an expert's slots held a token twice);
    - ``importance_cv``: coefficient of variation (std / mean) over experts of the mean router
      probability: 0 when the router spreads its probability evenly, sqrt(E - 1) when one expert
      gets all of it. Expert choice fills every expert regardless, so this is where imbalance shows.
    """
    probs = routing.probs  # (N, T, E)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
    chosen = tokens_chosen(routing)  # (N, E, T)
    taken = chosen.sum(dim=1)  # (N, T): experts that took each token
    importance = probs.mean(dim=(0, 1))  # (E,)
    return {
        "router_entropy": entropy,
        "dropped_fraction": (taken == 0).float().mean(),
        "experts_per_token": taken.mean(),
        "tokens_per_expert": chosen.sum(dim=(0, 2)).mean(),
        "importance_cv": importance.std(correction=0) / importance.mean(),
    }
