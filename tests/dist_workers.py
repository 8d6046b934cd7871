"""Multi-process CPU workers (gloo, DS_ACCELERATOR=cpu) for the DeepSpeed tests.

Each worker runs in its own process started by ``spawn``; results go to JSON/tensor files that
the test then checks, so assertion messages stay readable.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from helpers import perturb_zero_init


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    import deepspeed

    from sedit import distributed

    deepspeed.init_distributed(dist_backend="gloo")
    fn(rank, world, *args)
    distributed.barrier()
    distributed.stop()  # tear gloo down before exit, not in interpreter shutdown, as the trainer does


def run_spawn(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _write(out: Path, rank: int, payload: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(payload))


def tiny_config(micro_batch: int = 2, world: int = 2, mask_ratio: float = 0.75):
    from sedit.config import build_config

    return build_config(
        {
            "preset": "tiny",
            "stage": {
                "resolution": 64,
                "micro_batch": micro_batch,
                "global_batch": micro_batch * world,
                "mask_ratio": mask_ratio,
                "lr": 3e-3,
                "weight_decay": 0.0,
                "grad_clip": 1.0,
            },
        }
    )


def fixed_batch(rank: int, n: int, cfg):
    g = torch.Generator().manual_seed(100 + rank)
    latents = torch.randn(n, cfg.model.in_channels, 8, 8, generator=g) * 0.9
    captions = torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim, generator=g)
    return latents, captions


# ----------------------------------------------------------------------------------------------
# Expert-parallel layer against the single-process layer
# ----------------------------------------------------------------------------------------------


def layer_equivalence(rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    from sedit.moe import ExpertChoiceMoE
    from sedit.moe.expert_parallel import shard_experts

    torch.manual_seed(0)
    reference = torch.nn.Sequential(ExpertChoiceMoE(16, 24, 4, 2.0))
    torch.nn.init.normal_(reference[0].router.weight.weight, std=1.0)
    parallel = shard_experts(copy.deepcopy(reference), world, rank)
    parallel[0].set_deepspeed_parallelism()
    x = torch.randn(2 * world, 12, 16, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2 * world, 12, 16, generator=torch.Generator().manual_seed(2))
    mine = slice(2 * rank, 2 * rank + 2)

    x_local = x[mine].clone().requires_grad_(True)
    y_local = parallel(x_local)
    y_local.backward(grad_out[mine])
    x_ref = x.clone().requires_grad_(True)
    y_ref = reference(x_ref)
    y_ref.backward(grad_out)

    router_grad = parallel[0].router.weight.weight.grad.clone()
    dist.all_reduce(router_grad)  # each rank saw only its images; the sum is the full gradient
    local = parallel[0].local_expert_range
    ref_experts = reference[0].experts

    def err(a, b):
        return (a - b).abs().max().item()

    _write(
        out,
        rank,
        {
            "output": err(y_local, y_ref[mine]),
            "grad_input": err(x_local.grad, x_ref.grad[mine]),
            "grad_router": err(router_grad, reference[0].router.weight.weight.grad),
            **{
                f"grad_{name}": err(p.grad, getattr(ref_experts, name).grad[local.start : local.stop])
                for name, p in parallel[0].experts.named_parameters()
            },
        },
    )


# ----------------------------------------------------------------------------------------------
# The DeepSpeed engine: expert placement, training, resume, export
# ----------------------------------------------------------------------------------------------


def _engine(cfg, ds_name: str, bf16: bool, seed: int = 0):
    import torch.distributed as dist

    from sedit.engine import build_engine, load_ds_config, resolve_ds_config
    from sedit.model import build_model

    ds = resolve_ds_config(load_ds_config(Path("ds_configs") / ds_name), cfg, dist.get_world_size(), ep_size=2)
    ds["bf16"]["enabled"] = bf16
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    perturb_zero_init(net, seed=seed)  # a trained-looking start: every path carries gradient
    full = copy.deepcopy(net)
    engine, _ = build_engine(cfg, ds, net)
    return engine, full


def _expert_weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    from sedit.moe.expert_parallel import ExpertChoiceEPLayer

    layer = next(m for m in engine.module.modules() if isinstance(m, ExpertChoiceEPLayer))
    return layer, safe_get_full_fp32_param(layer.experts.w1)


def _train_steps(engine, cfg, latents, captions, steps: int) -> list[float]:
    from sedit.edm import EDMLoss

    loss_fn = EDMLoss.from_config(cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    losses = []
    for _ in range(steps):
        g = torch.Generator().manual_seed(7 + engine.global_rank)  # same sigma/noise/mask every step
        loss = loss_fn(engine, latents.to(dtype), captions.to(dtype), cfg.stage.mask_ratio, g)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def engine_training(rank: int, world: int, ds_name: str, out: Path) -> None:
    """Expert placement, three steps lower the loss, save -> resume gives the same next step."""
    import torch.distributed as dist

    from sedit.checkpoint import load_training_state, save_training_state

    cfg = tiny_config(world=world)
    engine, full = _engine(cfg, ds_name, bf16=True)
    layer, w_in = _expert_weights(engine)
    mine = layer.local_expert_range
    full_layer = next(m for m in full.modules() if type(m).__name__ == "ExpertChoiceMoE")
    own_slice = full_layer.experts.w1[mine.start : mine.stop].detach().bfloat16().float()  # bf16 engine weights
    matches_own_slice = torch.equal(w_in, own_slice)
    gathered = [torch.empty_like(w_in) for _ in range(world)]
    dist.all_gather(gathered, w_in.contiguous())
    distinct = not torch.equal(gathered[0], gathered[1])

    latents, captions = fixed_batch(rank, cfg.stage.micro_batch, cfg)
    losses = _train_steps(engine, cfg, latents, captions, 3)
    save_training_state(engine, out / "ckpt", "step_3", {"step": 3})
    next_loss = _train_steps(engine, cfg, latents, captions, 1)[0]

    resumed, _ = _engine(cfg, ds_name, bf16=True, seed=123)  # different weights until loaded
    client = load_training_state(resumed, out / "ckpt")
    resumed_loss = _train_steps(resumed, cfg, latents, captions, 1)[0]
    _, w_after = _expert_weights(resumed)
    gathered = [torch.empty_like(w_after) for _ in range(world)]
    dist.all_gather(gathered, w_after.contiguous())
    _write(
        out,
        rank,
        {
            "optimizer": type(engine.optimizer).__name__,
            "inner_optimizer_fused": engine.optimizer.optimizer.defaults.get("fused"),
            "zero3_leaf_modules": sorted(
                {type(m).__name__ for m in engine.module.modules() if getattr(m, "_z3_leaf", 0)}
            ),
            "matches_own_slice": matches_own_slice,
            "distinct_experts": distinct,
            "distinct_after_training": not torch.equal(gathered[0], gathered[1]),
            "losses": losses,
            "next_loss": next_loss,
            "resumed_loss": resumed_loss,
            "client_step": client.get("step"),
        },
    )


def _reference_gradients(full, cfg, world: int):
    """Gradients of the mean over ranks of each rank's loss, computed by one process on the full model."""
    from sedit.edm import EDMLoss, EDMPrecond

    precond = EDMPrecond(full, cfg.diffusion.sigma_data)
    loss_fn = EDMLoss.from_config(cfg)
    total = 0.0
    for r in range(world):
        latents, captions = fixed_batch(r, cfg.stage.micro_batch, cfg)
        total = total + loss_fn(precond, latents, captions, cfg.stage.mask_ratio, torch.Generator().manual_seed(7 + r))
    (total / world).backward()
    return {name: p.grad for name, p in precond.named_parameters()}


def engine_export(rank: int, world: int, ds_name: str, out: Path) -> None:
    """fp32 engine at ep=2: gradients and grad norm against one process, one step, then export;
    record this rank's forward output and inputs."""
    from deepspeed.utils import safe_get_full_grad

    from sedit.checkpoint import export_consolidated
    from sedit.masking import random_keep_indices
    from sedit.moe.expert_parallel import ExpertChoiceEPLayer

    cfg = tiny_config(world=world)
    engine, full = _engine(cfg, ds_name, bf16=False)
    reference = _reference_gradients(full, cfg, world)
    expert_params = {
        id(p): layer.local_expert_range
        for layer in engine.module.modules()
        if isinstance(layer, ExpertChoiceEPLayer)
        for p in layer.experts.parameters()
    }
    latents, captions = fixed_batch(rank, cfg.stage.micro_batch, cfg)
    from sedit.edm import EDMLoss

    loss_fn = EDMLoss.from_config(cfg)
    loss = loss_fn(engine, latents, captions, cfg.stage.mask_ratio, torch.Generator().manual_seed(7 + rank))
    engine.backward(loss)
    worst = 0.0
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        ref = reference[name]
        if id(param) in expert_params:
            ref = ref[expert_params[id(param)].start : expert_params[id(param)].stop]
        worst = max(worst, ((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    engine.step()  # export trained, not initial, weights
    reference_norm = torch.sqrt(sum(g.square().sum() for g in reference.values())).item()
    export_consolidated(engine.module, cfg, out / "export")
    sigma = torch.tensor([0.5, 3.0])
    keep = random_keep_indices(2, 16, 0.75, torch.Generator().manual_seed(rank))
    engine.eval()
    with torch.no_grad():
        y = engine(latents, sigma, captions, keep)
    record = {"latents": latents, "captions": captions, "sigma": sigma, "keep": keep, "out": y}
    torch.save(record, out / f"fwd{rank}.pt")
    _write(
        out,
        rank,
        {"grad_rel_err": worst, "grad_norm": float(engine.get_global_grad_norm()), "ref_norm": reference_norm},
    )


# ----------------------------------------------------------------------------------------------
# Preemption: every rank agrees to stop when any rank received the signal
# ----------------------------------------------------------------------------------------------


def stop_agreement(rank: int, world: int, out: Path) -> None:
    import signal

    from sedit.preemption import StopRequest

    with StopRequest() as stop:
        before = stop.agreed()
        if rank == 1:
            signal.raise_signal(signal.SIGUSR1)
        after = stop.agreed()
    _write(out, rank, {"before": before, "after": after, "received": stop.received})


# ----------------------------------------------------------------------------------------------
# EMA of partitioned master weights
# ----------------------------------------------------------------------------------------------


def engine_ema(rank: int, world: int, ds_name: str, out: Path) -> None:
    """The EMA export equals an EMA computed by hand from the whole master weights after each step."""
    from sedit.checkpoint import consolidated_state_dict
    from sedit.ema import EMA

    cfg = tiny_config(world=world)
    engine, _ = _engine(cfg, ds_name, bf16=True)
    net = engine.module.net
    decay, start = 0.6, 1
    ema = EMA(net, decay, start_step=start)
    latents, captions = fixed_batch(rank, cfg.stage.micro_batch, cfg)
    expected = None
    kinds = sorted({m.kind for m in ema.masters.values()})
    for step in range(1, 5):
        _train_steps(engine, cfg, latents, captions, 1)
        ema.update(step)
        whole = consolidated_state_dict(net)  # the master weights after this step
        if step <= start:
            expected = whole
        else:
            expected = {k: decay * expected[k] + (1 - decay) * whole[k] for k in whole}
    averaged = consolidated_state_dict(net, ema.full_value)
    raw = consolidated_state_dict(net)
    errors = {k: (averaged[k] - expected[k]).abs().max().item() for k in expected}
    moved = max((averaged[k] - raw[k]).abs().max().item() for k in raw)
    _write(out, rank, {"kinds": kinds, "max_error": max(errors.values()), "differs_from_raw": moved})


# ----------------------------------------------------------------------------------------------
# Flat-buffer data parallelism (sedit.flat_grads) against one process
# ----------------------------------------------------------------------------------------------


def flat_data_parallel(rank: int, world: int, out: Path) -> None:
    """Each rank back-propagates two micro-batches of its share through a tiny SparseDiT; the reduced
    and clipped flat gradient must equal one process's, of the mean loss over all ranks' micro-batches."""
    from sedit.edm import EDMLoss, EDMPrecond
    from sedit.flat_grads import FlatGradients
    from sedit.model import build_model

    cfg = tiny_config(micro_batch=2, world=world)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    perturb_zero_init(net)  # zero-initialised outputs would leave most gradients zero
    reference = EDMPrecond(copy.deepcopy(net), cfg.diffusion.sigma_data)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data)
    loss_fn = EDMLoss.from_config(cfg)
    micro_batches = 2

    def loss_of(model, k: int):  # micro-batch k of the whole step (rank k // micro_batches), fixed noise
        latents, captions = fixed_batch(k, cfg.stage.micro_batch, cfg)
        return loss_fn(model, latents, captions, cfg.stage.mask_ratio, torch.Generator().manual_seed(7 + k))

    grads = FlatGradients(precond.parameters())
    for k in range(rank * micro_batches, (rank + 1) * micro_batches):
        (loss_of(precond, k) * grads.loss_scale(micro_batches)).backward()
    grads.all_reduce_()
    max_norm = 1e-3  # below the gradient's norm, so clipping acts
    norm = grads.clip_(max_norm)

    full = sum(loss_of(reference, k) for k in range(world * micro_batches)) / (world * micro_batches)
    full.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    pairs = list(zip(precond.parameters(), reference.parameters(), strict=True))
    _write(
        out,
        rank,
        {
            "mismatched": [i for i, (p, q) in enumerate(pairs) if not torch.allclose(p.grad, q.grad, 1e-4, 1e-7)],
            "max_grad": max(q.grad.abs().max().item() for _, q in pairs),
            "norm": norm.item(),
            "reference_norm": ref_norm.item(),
            "max_norm": max_norm,
            "bound": grads.bound(),
        },
    )
