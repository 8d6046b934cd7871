"""DeepSpeed set-up: topology checks, config resolution, optimizer groups, engine construction.

The model is built whole, its MoE layers are swapped for expert-parallel ones holding this rank's
experts (``shard_experts``), and only then handed to ``deepspeed.initialize``, so ZeRO-3 partitions
expert parameters over the expert-data-parallel group and the rest over the data-parallel group.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from sedit.config import Config, ConfigError
from sedit.edm import EDMPrecond
from sedit.flat_engine import weight_decay_groups
from sedit.model import SparseDiT, build_model
from sedit.moe.expert_parallel import ExpertChoiceEPLayer, shard_experts


class TopologyError(ValueError):
    """The requested parallel layout cannot run; raised before any process group or model exists."""


def check_topology(num_experts: int, ep_size: int, world_size: int) -> None:
    """Refuse an expert-parallel size that does not divide the experts or the world size."""
    if ep_size < 1:
        raise TopologyError(f"expert-parallel size must be >= 1, got {ep_size}")
    if num_experts % ep_size:
        options = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]
        raise TopologyError(
            f"expert-parallel size {ep_size} does not divide the {num_experts} experts of each MoE layer; "
            f"with {world_size} processes choose one of {options} (--ep or expert_parallel.autoep_size)"
        )
    if world_size % ep_size:
        raise TopologyError(
            f"expert-parallel size {ep_size} does not divide the world size {world_size}: every expert-parallel "
            f"group needs {ep_size} processes; run a multiple of {ep_size} processes or lower --ep"
        )


ENGINES = ("deepspeed", "flat")  # the --ds config's "engine": DeepSpeed's, or sedit.flat_engine


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if ds.get("engine", "deepspeed") not in ENGINES:
        raise ConfigError(f"{path}: engine: {ds['engine']!r} is not one of {list(ENGINES)}")
    if engine_kind(ds) == "flat":
        check_flat_config(ds, path)
    return ds


def check_flat_config(ds: dict[str, Any], path: Path) -> None:
    """Refuse DeepSpeed settings the flat engine would otherwise ignore in silence."""
    unsupported = {
        "zero_optimization": "ZeRO (the flat engine replicates all state)",
        "fp16": "fp16 (use bf16 autocast)",
        "scheduler": "a DeepSpeed lr scheduler (the stage config's schedule applies)",
    }
    for key, what in unsupported.items():
        if key in ds and ds[key] not in ({}, {"enabled": False}):
            raise ConfigError(f"{path}: {key}: the flat engine has no {what}; remove the field")
    kind = ds.get("optimizer", {}).get("type", "AdamW")
    if kind.lower() != "adamw":
        raise ConfigError(f"{path}: optimizer.type: the flat engine runs torch's AdamW, not {kind!r}")


def engine_kind(ds_config: dict[str, Any]) -> str:
    return ds_config.get("engine", "deepspeed")


def resolve_ds_config(
    ds_config: dict[str, Any], cfg: Config, world_size: int, ep_size: int | None = None
) -> dict[str, Any]:
    """Fill batch sizes, clipping and optimizer settings from the stage; set the expert-parallel size.

    The JSON file holds what is DeepSpeed's business (ZeRO stage, buckets, precision); the stage
    config holds the recipe. Returns a new dict; the input is not modified.
    """
    ds = copy.deepcopy(ds_config)
    stage = cfg.stage
    ep = ds.setdefault("expert_parallel", {"enabled": True})
    if ep_size is not None:
        ep["autoep_size"] = ep_size
    ep.setdefault("autoep_size", 1)
    ep["enabled"] = True
    check_topology(cfg.model.num_experts, int(ep["autoep_size"]), world_size)
    if engine_kind(ds) == "flat" and int(ep["autoep_size"]) != 1:
        raise TopologyError(
            f"expert-parallel size {ep['autoep_size']}: the flat engine keeps every expert on every rank; "
            "use --ep 1, or a DeepSpeed config to shard experts"
        )
    accum = stage.accumulation(world_size)
    ds["train_micro_batch_size_per_gpu"] = stage.micro_batch
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = stage.micro_batch * world_size * accum
    ds["gradient_clipping"] = stage.grad_clip
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    params.update(lr=stage.lr, betas=list(stage.betas), eps=stage.eps, weight_decay=stage.weight_decay)
    return ds


def ep_size_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("expert_parallel", {}).get("autoep_size", 1))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and expert weight stacks), none on norms, biases and gains.

    Expert parameters go into their own groups (DeepSpeed's MoE grouping) so ZeRO reduces them over
    the expert-data-parallel group.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(weight_decay_groups(model, weight_decay))


def build_engine(cfg: Config, ds_config: dict[str, Any], net: SparseDiT | None = None):
    """(engine, EDMPrecond module) for this rank: DeepSpeed's, or a ``FlatEngine`` where the config's
    ``engine`` says ``flat``. ``deepspeed.init_distributed`` must have run."""
    import deepspeed
    import torch.distributed as dist

    ep = ep_size_of(ds_config)
    check_topology(cfg.model.num_experts, ep, dist.get_world_size())
    if net is None:
        torch.manual_seed(cfg.stage.seed)  # identical initial weights on every rank
        net = build_model(cfg.model)
    if engine_kind(ds_config) == "flat":
        return build_flat_engine(cfg, ds_config, net)
    ep_rank = dist.get_rank() % ep  # DeepSpeed's expert-parallel groups are runs of consecutive ranks
    shard_experts(net, ep, ep_rank)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data)
    engine, _, _, _ = deepspeed.initialize(
        model=precond,
        model_parameters=optimizer_groups(precond, cfg.stage.weight_decay),
        config=ds_config,
    )
    for layer in engine.module.modules():
        if isinstance(layer, ExpertChoiceEPLayer) and ep > 1 and dist.get_rank(group=layer.ep_group) != ep_rank:
            raise RuntimeError("DeepSpeed's expert-parallel group does not match the sharded experts")
    return engine, precond


def build_flat_engine(cfg: Config, ds_config: dict[str, Any], net: SparseDiT):
    """Every rank the whole model, starting from rank 0's weights (broadcast once)."""
    import torch.distributed as dist

    from sedit.distributed import device
    from sedit.flat_engine import FlatEngine

    precond = EDMPrecond(net, cfg.diffusion.sigma_data)
    engine = FlatEngine(precond, ds_config, device())
    for tensor in [*precond.parameters(), *precond.buffers()]:
        dist.broadcast(tensor.data, src=0)
    return engine, precond
