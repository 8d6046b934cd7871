"""Expert-choice MoE on DeepSpeed's expert-parallel machinery (ZeRO-3 and ZeRO-1/2).

DeepSpeed 0.19 runs MoE under ZeRO-3 only through AutoEP layers (``AutoEPMoELayer``): the engine
recognises them by class, binds their expert-parallel group (``set_deepspeed_parallelism``), and
partitions parameters tagged ``ds_zero_placement_family="autoep_expert"`` over the expert-data-
parallel group of ``ds_zero_partition_group_name``; everything else over the data-parallel group.
AutoEP itself routes by token choice and builds its layers by converting HF MoE blocks.

``ExpertChoiceEPLayer`` is an ``AutoEPMoELayer`` built directly (not converted from a source module)
with expert-choice routing:

    1. route per image on the local rank:   gates, index (N, E, C)   [no cross-rank top-k]
    2. dispatch by index:                   (E, N*C, D), expert-major, so rank r's experts are rows
                                            [r*E_l*N*C, (r+1)*E_l*N*C)
    3. all-to-all (DeepSpeed ``_AllToAllV``) to the experts' owners -> (S, E_l, N*C, D)
    4. the E_l local SwiGLU experts (DeepSpeed's ``GroupedExperts`` weights) on S*N*C rows each
    5. all-to-all back, combine with the gates -> (N, T, D)

Every expert takes exactly C tokens from every image, so the splits are equal whenever the micro-
batch is the same on every rank (DeepSpeed requires that); they are still passed explicitly.

The experts carry the AutoEP placement metadata (contiguous uniform placement: rank r owns experts
[r*E_l, (r+1)*E_l)) that DeepSpeed's checkpointing reads, so ``engine.save_checkpoint`` and
``load_checkpoint`` handle them as they handle converted AutoEP layers.
"""

from __future__ import annotations

import torch
from deepspeed.checkpoint.autoep_affine import (
    autoep_experts_for_rank,
    autoep_placement_to_affine_map,
    legacy_uniform_autoep_placement_descriptor,
)
from deepspeed.checkpoint.constants import (
    AFFINE_MAP,
    AUTOEP_EXPERT_PLACEMENT,
    AUTOEP_PARAM_EP_RANK,
    AUTOEP_PARAM_LOCAL_EXPERTS,
    AUTOEP_PARAM_LOGICAL_SHAPE,
    DS_AUTOEP_UC_META,
)
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, _AllToAllV
from deepspeed.moe.ep_experts import GroupedExperts as DeepSpeedGroupedExperts
from torch import nn

from sedit.moe.experts import expert_mlp
from sedit.moe.layer import ExpertChoiceMoE
from sedit.moe.routing import ExpertChoiceRouter


class BatchedExperts(DeepSpeedGroupedExperts):
    """DeepSpeed's expert weights (w1, w2, w3 of shape (E_l, F, D), (E_l, D, F), (E_l, F, D)) run as
    batched matmuls on (E_l, M, D): every expert holds M tokens under expert choice. DeepSpeed's own
    forward takes ragged groups through ``torch._grouped_mm``, which refuses weights that ZeRO-3
    gathers at offsets not aligned to 16 bytes (seen at ep = 4)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return expert_mlp(tokens, self.w1, self.w2, self.w3)  # (E_l, M, D)


class ExpertChoiceEPLayer(AutoEPMoELayer):
    """Expert-choice MoE whose E experts are split over an expert-parallel group of ``ep_size`` ranks."""

    def __init__(
        self, dim: int, hidden: int, num_experts: int, capacity: float, gated: bool, ep_size: int, ep_rank: int
    ):
        # AutoEPMoELayer.__init__ converts an HF MoE block; this layer is built from its own parts, so
        # only nn.Module is initialised and the attributes the DeepSpeed engine reads are set here.
        nn.Module.__init__(self)
        if num_experts % ep_size:
            raise ValueError(f"expert-parallel size {ep_size} does not divide the {num_experts} experts")
        if not gated:
            raise ValueError(
                "model.expert_gated: DeepSpeed's expert-parallel experts are SwiGLU (w1, w2, w3); "
                "set expert_gated: true to train with DeepSpeed"
            )
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.capacity = capacity
        self.ep_group_name = f"ep_size_{ep_size}"
        self.ep_group = None  # bound by the engine through set_deepspeed_parallelism()
        self.folding_group_handles = None
        self.tp_group = None
        self.router = ExpertChoiceRouter(dim, num_experts, capacity)
        self.experts = BatchedExperts(dim, hidden, self.num_local_experts, use_grouped_mm=False)
        self.last_routing = None
        self._tag_expert_parameters()
        for param in self.router.parameters():
            param.allreduce = True
            param.ds_zero_placement_family = "replicated"

    def _tag_expert_parameters(self) -> None:
        """What DeepSpeed reads off AutoEP expert parameters: reduction group, ZeRO-3 placement, and
        the placement metadata its checkpoints record."""
        self.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(
            self.num_experts, self.num_local_experts, self.ep_size
        )
        local_experts = list(autoep_experts_for_rank(self.expert_placement_descriptor, self.ep_rank))
        for param in self.experts.parameters():
            # Expert gradients are reduced (and ZeRO-3 partitions them) over the expert-data-parallel group.
            param.allreduce = False
            param.group_name = self.ep_group_name
            param.ds_zero_placement_family = "autoep_expert"
            param.ds_zero_partition_group_name = self.ep_group_name
            logical_shape = [self.num_experts, *param.shape[1:]]
            affine_map = autoep_placement_to_affine_map(self.expert_placement_descriptor, logical_shape)
            setattr(
                param,
                DS_AUTOEP_UC_META,
                {
                    AUTOEP_EXPERT_PLACEMENT: self.expert_placement_descriptor,
                    AFFINE_MAP: affine_map.to_dict(),
                    AUTOEP_PARAM_LOGICAL_SHAPE: logical_shape,
                    AUTOEP_PARAM_EP_RANK: self.ep_rank,
                    AUTOEP_PARAM_LOCAL_EXPERTS: local_experts,
                },
            )

    @property
    def local_expert_range(self) -> range:
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    def _all_to_all(self, rows: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all over the expert-parallel group of a (S*R, D) tensor."""
        split = [rows.shape[0] // self.ep_size] * self.ep_size
        return _AllToAllV.apply(self.ep_group, rows, split, split)

    def run_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(E, M, D) expert-major tokens of this rank -> experts' outputs, via the experts' owners."""
        e, m, d = tokens.shape
        if self.ep_size == 1:
            return self.experts(tokens)
        s, el = self.ep_size, self.num_local_experts
        received = self._all_to_all(tokens.reshape(e * m, d))  # (S*E_l*M, D): [source][local expert][M]
        local = received.view(s, el, m, d).transpose(0, 1).reshape(el, s * m, d)  # (E_l, S*M, D)
        out = self.experts(local)  # (E_l, S*M, D)
        # contiguous: with one local expert the reshape is a strided view of the experts' output
        back = out.view(el, s, m, d).transpose(0, 1).reshape(s * el * m, d).contiguous()  # (S*E_l*M, D)
        return self._all_to_all(back).view(e, m, d)  # (E, M, D): every expert's output for our tokens

    # route this rank's images, dispatch, run_experts (all-to-all above), combine: the single-process steps
    forward = ExpertChoiceMoE.forward


# ----------------------------------------------------------------------------------------------
# Converting between the single-process model and the expert-parallel one
# ----------------------------------------------------------------------------------------------


def _replace_modules(model: nn.Module, kind: type, build) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, build(child))
                count += 1
    return count


def shard_experts(model: nn.Module, ep_size: int, ep_rank: int) -> nn.Module:
    """Swap every ``ExpertChoiceMoE`` for an ``ExpertChoiceEPLayer`` holding this rank's experts.

    Call before ``deepspeed.initialize`` (and before any ZeRO-3 partitioning): the router and the
    local slice of the expert weights are copied from the full layer.
    """

    def build(layer: ExpertChoiceMoE) -> ExpertChoiceEPLayer:
        experts = layer.experts
        dim = experts.w1.shape[-1]
        ep = ExpertChoiceEPLayer(
            dim, experts.hidden, layer.num_experts, layer.capacity, experts.gated, ep_size, ep_rank
        ).to(device=experts.w1.device, dtype=experts.w1.dtype)
        local = ep.local_expert_range
        with torch.no_grad():
            ep.router.weight.weight.copy_(layer.router.weight.weight)
            for name, param in ep.experts.named_parameters():
                param.copy_(getattr(experts, name)[local.start : local.stop])
        return ep

    _replace_modules(model, ExpertChoiceMoE, build)
    return model
