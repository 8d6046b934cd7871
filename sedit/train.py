"""One training stage: resolve configs, build the engine (DeepSpeed's, or the flat one), train, checkpoint, export.

Run directory layout (``--out``):
    config.yaml        resolved run config          ds_config.json   resolved DeepSpeed config
    metrics.jsonl      one line per logged step     wandb/           wandb's files (offline by default)
    samples/           sample grids, step_NNNNNNN.png, and the prompts they show
    checkpoints/       step_NNNNNNN/ (engine state, per-rank trainer state, export/, manifest), ``latest``
    final/             consolidated export (model.safetensors + config.yaml): the EMA weights when
                       ``stage.ema_decay`` > 0, else the raw ones; loadable at any topology
    summary.json       what the stage did: steps, time, throughput, final loss

``stage.init_from`` (a previous stage's ``final/``) gives a fresh run its starting weights; a resumed
run takes everything from its newest intact checkpoint (model, optimizer, EMA, data position, RNG),
so its loss curve continues exactly where the interrupted one stopped. On SIGUSR1/SIGTERM every rank
finishes its step, a checkpoint is written and ``run_stage`` returns ``preemption.REQUEUE_EXIT``. A
non-finite loss stops the run with ``DivergedError`` before anything is written after it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from argparse import Namespace
from pathlib import Path

import torch
import yaml

from sedit import distributed
from sedit.checkpoint import EMA_FILE, MODEL_FILE, export_consolidated, master_value
from sedit.checkpoint_integrity import candidates, checkpoint_info, newest_intact, tag_for
from sedit.config import Config, ConfigError, load_config, merge, parse_override, to_dict
from sedit.edm import EDMLoss
from sedit.ema import EMA
from sedit.engine import build_engine, engine_kind, ep_size_of, load_ds_config, resolve_ds_config
from sedit.files import atomic_write_text
from sedit.preemption import REQUEUE_EXIT, StopRequest
from sedit.schedule import learning_rate
from sedit.stage_data import SYNTHETIC, check_prepared, training_batches

DIVERGED_EXIT = 3  # exit status of a run stopped by a non-finite loss


class DivergedError(RuntimeError):
    """The loss (or the flat engine's gradient norm) became NaN or infinite; nothing after the last good
    checkpoint was kept."""


def resolve(args: Namespace) -> tuple[Config, dict, Path]:
    """Stage config, DeepSpeed config and run directory; all checks happen here, before any work."""
    overrides: dict = {}
    for item in args.set:
        overrides = merge(overrides, parse_override(item))
    cfg = load_config(args.config, overrides)
    ds = resolve_ds_config(load_ds_config(args.ds), cfg, distributed.world_size(), args.ep)
    if not cfg.stage.data:
        raise ConfigError(
            f"{args.config}: stage.data: no data source given (a prepared shard directory, or 'synthetic')"
        )
    if cfg.stage.data != SYNTHETIC:
        check_prepared(cfg, args.config)
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


def warn0(message: str) -> None:
    distributed.print0(f"warning: {message}")


def run_stage(args: Namespace) -> int:
    cfg, ds, out = resolve(args)
    if args.dry_run:
        distributed.print0(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        distributed.print0(json.dumps(ds, indent=2))
        return 0

    # DeepSpeed 0.19.8 calls collectives torch has renamed; the warning repeats every step and says nothing to users
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    stop = StopRequest().install()  # before the slow start-up, so an early signal is not fatal
    device = distributed.start()
    distributed.print0(json.dumps({"ranks": distributed.describe_ranks()}))
    if distributed.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    try:
        stage = Stage(cfg, ds, out, device, stop, resume=args.resume == "auto")
        write_run_files(out, cfg, ds)  # once a resume has been accepted: they say what the checkpoints hold
        return stage.run()
    finally:
        stop.restore()
        distributed.stop()


def write_run_files(out: Path, cfg: Config, ds: dict) -> None:
    """The resolved run and engine configs (rank 0, atomically). The pipeline resumes a half-finished
    stage with its ``ds_config.json``, so it is written only after ``restore()`` accepted this layout."""
    if distributed.rank() == 0:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(out / "ds_config.json", json.dumps(ds, indent=2))
    distributed.barrier()


class Stage:
    """The state of one running stage and its training loop."""

    def __init__(self, cfg: Config, ds: dict, out: Path, device: torch.device, stop: StopRequest, resume: bool):
        from sedit.metrics import MetricsLog
        from sedit.sample_grid import SampleGrid

        self.cfg, self.out, self.device, self.stop = cfg, out, device, stop
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.ckpt_dir = out / "checkpoints"
        stage = cfg.stage
        resuming = resume and bool(candidates(self.ckpt_dir))
        net = None
        if stage.init_from and not resuming:
            from sedit.checkpoint import load_consolidated

            net, _ = load_consolidated(stage.init_from)
            distributed.print0(f"initialised from {stage.init_from}")
        self.engine, _ = build_engine(cfg, ds, net)
        if stage.compile:
            self.engine.module.net.use_grid(stage.resolution // stage.latent_downsample // cfg.model.patch_size)
            # under DeepSpeed the expert all-to-all and its hooks stay eager (graph breaks)
            self.engine.compile(compile_kwargs={"mode": stage.compile_mode})
            distributed.print0(f"torch.compile: {self.engine.is_compiled}; the first steps include compiling")
        self.ep, self.engine_kind = ep_size_of(ds), engine_kind(ds)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        # the flat engine's ranks hold the same weights: rank 0 alone keeps, stores and exports their EMA
        keeps_ema = stage.ema_decay > 0 and (self.engine_kind != "flat" or self.rank == 0)
        self.ema = EMA(self.engine.module.net, stage.ema_decay, stage.ema_start) if keeps_ema else None
        self.data = training_batches(cfg, self.rank, self.world, pin_memory=device.type == "cuda", device=device)
        self.generator = torch.Generator(device=device).manual_seed(stage.seed * 7919 + self.rank * 104729)
        self.step, self.seconds = 0, 0.0
        if resuming:
            self.restore()
        self.loss_fn = EDMLoss.from_config(cfg)
        self.grid = SampleGrid(cfg, out / "samples", device, self.rank == 0)
        self.log = MetricsLog(out, cfg, start_step=self.step, total_steps=stage.steps, main=self.rank == 0)
        accum = self.engine.gradient_accumulation_steps()
        distributed.print0(
            f"stage {stage.name}: world {self.world}, expert-parallel {self.ep}, micro-batch "
            f"{stage.micro_batch}, accumulation {accum}, global batch {stage.micro_batch * self.world * accum}, "
            f"steps {self.step}->{stage.steps}, EMA {stage.ema_decay or 'off'}"
        )

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------

    def restore(self) -> None:
        from sedit.checkpoint import load_training_state

        path = newest_intact(self.ckpt_dir, warn0)
        if path is None:
            raise ConfigError(
                f"{self.ckpt_dir}: no intact checkpoint to resume from (see the warnings above); "
                "move the directory away or pass --resume none to start over"
            )
        saved = checkpoint_info(path)
        saved.setdefault("engine", "deepspeed")  # written before there was another engine
        differ = {k: (saved.get(k), v) for k, v in self.layout().items() if saved.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differ.items())
            raise ConfigError(
                f"{path}: written with another layout ({what}); the optimizer state is laid out by it. "
                "Resume with the same layout, or start a new stage from an export (stage.init_from)"
            )
        state = load_training_state(self.engine, self.ckpt_dir, path.name)
        mine = state["rank_state"]
        self.step, self.seconds = int(state["step"]), float(state.get("seconds", 0.0))
        self.data.load_state_dict(mine["data"])
        self.generator.set_state(mine["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(mine["ema"])
        distributed.print0(f"resumed from {path} at step {self.step}")

    def forward_precision(self):
        """A context for forwards outside the engine (sample grids): the flat engine's autocast over its fp32
        weights; nothing for DeepSpeed, whose bf16 weights set the precision."""
        return self.engine.precision() if self.engine_kind == "flat" else contextlib.nullcontext()

    def layout(self) -> dict:
        """What a resumable checkpoint depends on: engine, processes, ZeRO stage, expert-parallel size."""
        return {
            "engine": self.engine_kind,
            "world_size": self.world,
            "zero_stage": self.engine.zero_optimization_stage(),
            "ep": self.ep,
        }

    def export_weights(self, final: bool) -> dict:
        """File -> value function for an export: the raw weights and the EMA, or (final) the one to use."""
        ema = None if self.ema is None else self.ema.full_value
        if final:
            return {MODEL_FILE: ema or master_value}
        return {MODEL_FILE: master_value} | ({EMA_FILE: ema} if ema else {})

    def export_into(self, directory: Path) -> None:
        export_consolidated(self.engine.module, self.cfg, directory, self.export_weights(final=False))

    def save(self) -> None:
        from sedit.checkpoint import save_training_state

        started = time.time()
        mine = {"step": self.step, "data": self.data.state_dict(), "generator": self.generator.get_state()}
        if self.ema is not None:
            mine["ema"] = self.ema.state_dict()
        save_training_state(
            self.engine,
            self.ckpt_dir,
            tag_for(self.step),
            {"step": self.step, "seconds": self.seconds, **self.layout()},
            rank_state=mine,
            export=self.export_into if self.cfg.stage.checkpoint_export else None,
            keep=self.cfg.stage.keep_checkpoints,
        )
        distributed.print0(f"checkpoint {tag_for(self.step)} written in {time.time() - started:.1f} s")

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------

    def train_step(self, batches, lr: float) -> torch.Tensor:
        """One optimizer step (all micro-batches); returns the mean loss of this rank, on device."""
        engine, stage = self.engine, self.cfg.stage
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        accum = engine.gradient_accumulation_steps()
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            batch = next(batches)
            latents = batch["latents"].to(self.device, self.dtype, non_blocking=True)
            captions = batch["captions"].to(self.device, self.dtype, non_blocking=True)
            loss = self.loss_fn(engine, latents, captions, stage.mask_ratio, self.generator)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        return total / accum

    def run(self) -> int:
        from sedit.metrics import memory_stats, moe_statistics, reduce_mean

        stage, engine = self.cfg.stage, self.engine
        batches = iter(self.data)
        started, seconds_before = time.time(), self.seconds
        tic, images_since = time.time(), 0  # throughput interval (restarted after grids and checkpoints)
        images_per_step = stage.micro_batch * self.world * engine.gradient_accumulation_steps()
        with self.log:
            while self.step < stage.steps:
                lr = learning_rate(self.step, stage)
                logging_now = (self.step + 1) % stage.log_every == 0 or self.step + 1 == stage.steps
                loss = self.train_step(batches, lr)
                stats = moe_statistics(engine.module) if logging_now else {}
                checked = {"loss": loss}
                if self.engine_kind == "flat":  # its gradient norm is on the device: checking it costs nothing
                    checked["grad_norm"] = engine.get_global_grad_norm()
                values = reduce_mean({**checked, **stats})  # every step: the divergence check needs it
                diverged = [f"{key} is {values[key]}" for key in checked if not math.isfinite(values[key])]
                if diverged:
                    last = candidates(self.ckpt_dir)
                    raise DivergedError(
                        f"step {self.step + 1}: {', '.join(diverged)} (mean over ranks); stopping without "
                        f"writing anything further. Last good checkpoint: {last[0] if last else 'none'}. "
                        "Lower stage.lr or raise stage.warmup_steps / stage.grad_clip, then resume."
                    )
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.step)
                images_since += images_per_step
                self.log.advance()
                if logging_now:
                    now = time.time()
                    record = {**values, "lr": lr, "images_per_s": images_since / max(now - tic, 1e-9)}
                    norm = engine.get_global_grad_norm()
                    if norm is not None:
                        record["grad_norm"] = float(norm)
                    if hasattr(self.data, "skipped"):
                        record.update({f"data/{k}": v for k, v in self.data.skipped.items()})
                    self.log.log(self.step, {**record, **memory_stats(self.device)})
                    tic, images_since = time.time(), 0
                self.seconds = seconds_before + time.time() - started
                if stage.sample_every and (self.step % stage.sample_every == 0 or self.step == stage.steps):
                    with self.forward_precision():
                        self.grid.write(engine.module, self.step, self.dtype)
                    tic, images_since = time.time(), 0
                stopping = self.stop.agreed(self.device) and self.step < stage.steps
                if self.step % stage.checkpoint_every == 0 or self.step == stage.steps or stopping:
                    self.save()
                    tic, images_since = time.time(), 0
                if stopping:
                    distributed.print0(f"stop signal: checkpoint at step {self.step} written; exiting {REQUEUE_EXIT}")
                    self.stop.ignore_from_now()
                    return REQUEUE_EXIT
        self.finish()
        return 0

    def finish(self) -> None:
        final = self.out / "final"
        export_consolidated(self.engine.module, self.cfg, final, self.export_weights(final=True))
        if self.rank == 0:
            summary = {
                "stage": self.cfg.stage.name,
                "steps": self.step,
                "seconds": round(self.seconds, 3),
                "images": self.step * self.cfg.stage.global_batch,
                "images_per_s": self.step * self.cfg.stage.global_batch / max(self.seconds, 1e-9),
                "final_weights": "ema" if self.ema is not None else "raw",
                "world_size": self.world,
            }
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            distributed.print0(f"exported {final}")
        distributed.barrier()
