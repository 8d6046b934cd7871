"""One training stage under DeepSpeed: resolve configs, build the engine, train, checkpoint, export.

Run directory layout (``--out``):
    config.yaml        resolved run config          ds_config.json   resolved DeepSpeed config
    metrics.jsonl      one line per logged step     checkpoints/     DeepSpeed state, ``latest`` pointer
    final/             consolidated export (model.safetensors + config.yaml), loadable at any topology

``stage.init_from`` (a previous stage's ``final/``) gives a fresh run its starting weights; a resumed
run takes everything from its checkpoint. On SIGUSR1/SIGTERM every rank finishes its step, a
checkpoint is written and ``run_stage`` returns ``preemption.REQUEUE_EXIT`` (see sedit/preemption.py).
"""

from __future__ import annotations

import json
import time
from argparse import Namespace
from pathlib import Path

import torch
import yaml

from sedit import distributed
from sedit.config import Config, ConfigError, load_config, merge, parse_override, to_dict
from sedit.edm import EDMLoss, drop_captions
from sedit.engine import build_engine, ep_size_of, load_ds_config, resolve_ds_config
from sedit.preemption import REQUEUE_EXIT, StopRequest
from sedit.schedule import learning_rate


def resolve(args: Namespace) -> tuple[Config, dict, Path]:
    """Stage config, DeepSpeed config and run directory; all checks happen here, before any work."""
    overrides: dict = {}
    for item in args.set:
        overrides = merge(overrides, parse_override(item))
    cfg = load_config(args.config, overrides)
    ds = resolve_ds_config(load_ds_config(args.ds), cfg, distributed.world_size(), args.ep)
    if not cfg.stage.data:
        raise ConfigError(f"{args.config}: stage.data: no data source given (a shard directory, or 'synthetic')")
    if cfg.stage.data != "synthetic":
        raise ConfigError(
            f"{args.config}: stage.data: {cfg.stage.data!r}: only 'synthetic' is wired into launch/stage.py so far"
        )
    if cfg.stage.ema_decay > 0:
        raise ConfigError(f"{args.config}: stage.ema_decay: EMA is not implemented in launch/stage.py yet; set it to 0")
    if cfg.stage.init_from:
        check_init_from(cfg, args.config)
    out = Path(args.out or Path("runs") / cfg.stage.name)
    return cfg, ds, out


def check_init_from(cfg: Config, source: str) -> None:
    """``stage.init_from`` must be a consolidated export of a model with this run's shape."""
    from sedit.checkpoint import export_config

    try:
        init = export_config(cfg.stage.init_from)
    except FileNotFoundError as err:
        raise ConfigError(f"{source}: stage.init_from: {err}; point it at the previous stage's final/") from None
    if init.model != cfg.model:
        differ = [k for k, v in vars(cfg.model).items() if getattr(init.model, k) != v]
        raise ConfigError(f"{source}: stage.init_from: {cfg.stage.init_from} has a different model ({differ})")


def trim_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: they came from steps lost since the checkpoint and will be redone."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def batches(cfg: Config, device: torch.device):
    from sedit.synthetic import synthetic_batches

    return synthetic_batches(cfg, distributed.rank(), device)


def run_stage(args: Namespace) -> int:
    cfg, ds, out = resolve(args)
    if args.dry_run:
        distributed.print0(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        distributed.print0(json.dumps(ds, indent=2))
        return 0

    import deepspeed

    stop = StopRequest().install()  # before the slow start-up, so an early signal is not fatal
    deepspeed.init_distributed(dist_backend="gloo" if distributed.device().type == "cpu" else "nccl")
    distributed.print0(json.dumps({"ranks": distributed.describe_ranks()}))
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    ckpt_dir = out / "checkpoints"
    resuming = args.resume == "auto" and (ckpt_dir / "latest").is_file()
    net = None
    if cfg.stage.init_from and not resuming:
        from sedit.checkpoint import load_consolidated

        net, _ = load_consolidated(cfg.stage.init_from)
        distributed.print0(f"initialised from {cfg.stage.init_from}")
    engine, _ = build_engine(cfg, ds, net)
    start = 0
    if resuming:
        from sedit.checkpoint import load_training_state

        start = int(load_training_state(engine, ckpt_dir).get("step", 0))
        distributed.print0(f"resumed from {ckpt_dir / (ckpt_dir / 'latest').read_text().strip()} at step {start}")

    stage = cfg.stage
    accum = engine.gradient_accumulation_steps()
    distributed.print0(
        f"stage {stage.name}: world {world}, expert-parallel {ep_size_of(ds)}, micro-batch {stage.micro_batch}, "
        f"accumulation {accum}, global batch {stage.micro_batch * world * accum}, steps {start}->{stage.steps}"
    )
    loss_fn = EDMLoss(cfg.diffusion.p_mean, cfg.diffusion.p_std, cfg.diffusion.sigma_data, cfg.model.patch_size)
    gen = torch.Generator(device=device).manual_seed(stage.seed * 7919 + rank * 104729 + start)
    data = batches(cfg, device)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    if rank == 0 and start:
        trim_metrics(out / "metrics.jsonl", start)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    tic = time.time()
    for step in range(start, stage.steps):
        lr = learning_rate(step, stage)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(accum):
            batch = next(data)
            captions = drop_captions(batch["captions"], stage.caption_dropout, gen)
            loss = loss_fn(engine, batch["latents"].to(dtype), captions.to(dtype), stage.mask_ratio, gen)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        loss_value = (total / accum).item()
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"step {step}: loss is {loss_value}; stopping (last checkpoint kept)")
        if rank == 0 and ((step + 1) % stage.log_every == 0 or step == stage.steps - 1):
            elapsed = time.time() - tic
            images = (step + 1 - start) * stage.micro_batch * world * accum
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "images_per_s": images / elapsed}
            print(json.dumps(record), flush=True)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        stopping = stop.agreed(device) and step + 1 < stage.steps
        if (step + 1) % stage.checkpoint_every == 0 or step == stage.steps - 1 or stopping:
            from sedit.checkpoint import save_training_state

            save_training_state(engine, ckpt_dir, f"step_{step + 1:07d}", {"step": step + 1})
        if stopping:
            distributed.print0(f"stop signal: checkpoint at step {step + 1} written; exiting {REQUEUE_EXIT}")
            if metrics:
                metrics.close()
            stop.ignore_from_now()
            return REQUEUE_EXIT
    from sedit.checkpoint import export_consolidated

    export_consolidated(engine.module, cfg, out / "final")
    distributed.print0(f"exported {out / 'final'}")
    if metrics:
        metrics.close()
    distributed.barrier()
    stop.restore()
    return 0
