"""The four-stage recipe in order: each stage starts from the previous stage's final weights.

    python launch/pipeline.py                                   # tiny preset, built-in data, runs/tiny
    python launch/pipeline.py --configs configs/xl/stage{1,2,3,4}.yaml --data data/coco --gpus 8 --out runs/xl

Each stage runs ``launch/stage.py`` in its own processes (one per GPU that its global batch splits over;
one on a CPU) into ``OUT/<stage.name>/`` with ``stage.init_from`` set to the previous stage's ``final/``
(fresh optimizer; position embeddings are recomputed for the new grid). A stage whose ``final/`` exists
is skipped; a half-finished one resumes from its newest intact checkpoint, on the engine config it
started with. When the data directory is the built-in
set and it is missing, it is built first. At the end ``OUT/report.md`` (and ``report.json``) lists per
stage the loss, time and throughput and shows a sample grid made from the final weights.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sedit.checkpoint import CONFIG_FILE, MODEL_FILE
from sedit.checkpoint_integrity import candidates
from sedit.config import Config, StageConfig, load_config, merge, parse_override
from sedit.preemption import STOP_SIGNALS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [f"configs/tiny/stage{k}.yaml" for k in (1, 2, 3, 4)]
BUILTIN_DATA = {  # default outputs of the built-in dataset builders (shards in DIR/shards)
    Path("data/emoji"): "sedit.data.builtin",
    Path("data/fmnist"): "sedit.data.fashion_mnist",
    Path("data/iconify"): "sedit.data.iconify_emoji",  # after `npm install` (package.json)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="stage configs, in order")
    p.add_argument("--out", default="runs/tiny", help="pipeline directory (one sub-directory per stage)")
    p.add_argument("--data", default=None, help="prepared shard directory for every stage (sets stage.data)")
    p.add_argument(
        "--ds", default=None, help="engine config (default: flat_dp.json on GPUs, cpu.json on a CPU; docs/training.md)"
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="processes per stage (default: all GPUs the stage's global batch splits over; 1 on a CPU)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel size (default: 1 for the flat engine, else gcd(processes, experts))",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    return p.parse_args(argv)


def stage_overrides(args: argparse.Namespace) -> list[str]:
    return ([f"stage.data={args.data}"] if args.data else []) + list(args.set)


def load_stage(path: str, overrides: list[str]) -> Config:
    merged: dict = {}
    for item in overrides:
        merged = merge(merged, parse_override(item))
    return load_config(path, merged)


def is_exported(directory: Path) -> bool:
    return (directory / MODEL_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def ensure_builtin_data(cfg: Config) -> None:
    """Build a built-in dataset (emoji, three-style emoji, Fashion-MNIST) that a stage asks for and is missing."""
    shards = Path(cfg.stage.data)
    if (shards / "manifest.json").is_file():
        return
    for folder, module in BUILTIN_DATA.items():
        if shards.resolve() == (folder / "shards").resolve():
            print(f"building the built-in dataset in {folder} (once; minutes on a CPU) ...", flush=True)
            importlib.import_module(module).build(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_command(
    args: argparse.Namespace, cfg: Config, config: str, ds: str, out: Path, overrides: list[str], gpus: int
) -> list[str]:
    ep = args.ep or default_ep(ds, gpus, cfg.model.num_experts)
    stage = [str(ROOT / "launch" / "stage.py"), "--config", config, "--ds", ds, "--out", str(out), "--resume", "auto"]
    stage += [f"--set={item}" for item in overrides] + ["--ep", str(ep)]
    if gpus > 1:
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus)]
        return runner + ["--master_port", str(free_port()), *stage]
    return [sys.executable, *stage]


def engine_config(chosen: str | None, out: Path) -> str:
    """``--ds`` if given; else, for a half-finished stage, the engine config it started with (its run
    directory's resolved ``ds_config.json``), so that a rerun resumes on the same engine even after the
    default changed; else this machine's default."""
    if chosen:
        return chosen
    started = out / "ds_config.json"
    if started.is_file() and candidates(out / "checkpoints"):
        return str(started)
    return str(ROOT / "ds_configs" / default_ds_config())


def default_ep(ds: str, gpus: int, num_experts: int) -> int:
    """1 for the flat engine (every expert on every rank); else the experts spread over as many
    processes as divide them."""
    from sedit.engine import engine_kind, load_ds_config

    return 1 if engine_kind(load_ds_config(ds)) == "flat" else math.gcd(gpus, num_experts)


def stage_env(gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    if gpus == 1:  # one process, no launcher: give torch.distributed its rendezvous
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not gpu_count():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def default_ds_config() -> str:
    """The flat engine on GPUs, fp32 ZeRO-2 on a CPU.

    On 4 H200s the trainer with the flat engine (and CUDA graphs) kept 90-99% of one GPU's rate at all
    four XL stages, and at stage 1 it ran 3.8x the eager ZeRO-2 + EP trainer's rate per GPU measured on
    2 H200s (docs/benchmarks.md). It needs the whole training state on every GPU (XL: ~21 GiB of state,
    31-38 GiB peak with the recipe's activations); DeepSpeed's configs (``--ds ds_configs/zero2_ep.json``,
    ``zero3.json``) are for models or cards where that does not fit.
    """
    if not gpu_count():
        return "cpu.json"
    return "flat_dp.json"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_forwarding_stop_signals(command: list[str], gpus: int) -> int:
    """Run one stage and wait for it. SIGTERM or SIGUSR1 sent to the pipeline (a scheduler, ``timeout``)
    is passed on to the stage process: a single-process stage stops after its current step, writes a
    checkpoint and exits with ``preemption.REQUEUE_EXIT``; the pipeline then exits with that status and
    a rerun resumes. With ``--gpus N`` the child is DeepSpeed's launcher, which kills its ranks on
    SIGTERM without a checkpoint: there, signal the ranks themselves (as launch/slurm does)."""
    child = subprocess.Popen(command, env=stage_env(gpus))
    forward = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum)) for sig in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)


def processes_for(stage: StageConfig, available: int) -> int:
    """As many of the ``available`` GPUs as the stage's global batch splits over evenly: global_batch =
    micro_batch x processes x accumulation (the tiny preset's 32 = 32 x 1 x 1 runs on one GPU)."""
    fits = [n for n in range(1, available + 1) if stage.splits_over(n)]
    return max(fits, default=1)  # none: one process, where the stage itself names the batch it cannot split


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    common = stage_overrides(args)
    previous: Path | None = None
    done: list[tuple[Config, Path]] = []
    for config in args.configs:
        overrides = common + ([f"stage.init_from={previous}"] if previous else [])
        cfg = load_stage(config, overrides)
        gpus = args.gpus or processes_for(cfg.stage, max(1, gpu_count()))
        stage_dir = out / cfg.stage.name
        final = stage_dir / "final"
        if is_exported(final):
            print(f"== {cfg.stage.name}: already finished ({final}); skipped", flush=True)
        else:
            ensure_builtin_data(cfg)
            what = "resuming" if (stage_dir / "checkpoints").is_dir() else "starting"
            ds = engine_config(args.ds, stage_dir)
            print(
                f"== {cfg.stage.name}: {what} ({config}, {gpus} process(es), {Path(ds).name}) -> {stage_dir}",
                flush=True,
            )
            started = time.time()
            code = run_forwarding_stop_signals(stage_command(args, cfg, config, ds, stage_dir, overrides, gpus), gpus)
            if code != 0:
                print(f"== {cfg.stage.name}: stopped with exit status {code}; rerun the same command to resume")
                return code
            print(f"== {cfg.stage.name}: done in {time.time() - started:.0f} s", flush=True)
        done.append((cfg, stage_dir))
        previous = final
    from sedit.pipeline_report import write_report

    report = write_report(out, done)
    print(f"report: {report}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
