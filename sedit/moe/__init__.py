"""Expert-choice Mixture-of-Experts: routing, dispatch and expert compute as separate pieces.

``routing`` decides which tokens each expert takes, ``dispatch`` moves tokens to an expert-major
layout and back, ``experts`` runs the grouped expert MLPs. ``layer`` joins them for one process;
the expert-parallel layer swaps in an all-to-all between dispatch and expert compute.
"""

from sedit.moe.experts import GroupedExperts
from sedit.moe.layer import ExpertChoiceMoE
from sedit.moe.routing import ExpertChoiceRouter, Routing, expert_capacity

__all__ = ["ExpertChoiceMoE", "ExpertChoiceRouter", "GroupedExperts", "Routing", "expert_capacity"]
