"""Host time of a training step, plain PyTorch against DeepSpeed, for XL's parameter structure on the CPU.

    python3 bench/host_overhead.py --ds ds_configs/zero1_ep.json ds_configs/zero2_ep.json ds_configs/zero3.json
    python3 bench/host_overhead.py --ds ds_configs/zero1_ep.json bench/ds_variants/*.json

(``bench/ds_variants/``: ``zero1_ep.json`` with one ZeRO setting changed each: overlapped reduction,
one 1e9-element bucket, ZeRO stage 0.)

The model has XL's modules and parameter tensors (28 backbone blocks, the 6-block patch-mixer, 16 MoE
layers: one tensor for each of XL's 533) at tiny widths and a tiny batch, so a step's arithmetic is small and
its time is mostly host work: Python, operator dispatch, loops over parameters. A GPU step launches the
same host work; where the GPU finishes its kernels sooner than the host issues them, this is the step's
floor. One process per set-up (gloo on the CPU, one thread, expert-parallel size 1, fp32 everywhere so
that the arithmetic is the same in every set-up). Each set-up's forward, backward and optimizer step are timed
apart (median of --steps after --warmup). DeepSpeed reduces gradients inside ``engine.backward`` and
clips inside ``engine.step``; the plain step clips (foreach) and steps torch's fused AdamW over the same
parameter groups that the engine's optimizer gets (weight decay on matrices only). The flat set-up is the
same step with its gradients in one buffer (``sedit.flat_grads``): one all-reduce (a no-op in one
process), one norm, one scaling, then the same fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedit.config import build_config  # noqa: E402
from sedit.edm import EDMLoss, EDMPrecond  # noqa: E402
from sedit.engine import optimizer_groups  # noqa: E402
from sedit.flat_grads import FlatGradients  # noqa: E402
from sedit.model import build_model  # noqa: E402

# XL's structure (depth, mixer depth, experts, MoE placement) at widths that make the arithmetic small
NARROW = {
    "width": 64,
    "head_dim": 16,
    "mixer_width": 32,
    "ffn_multiple": 16,
    "caption_dim": 32,
    "caption_len": 8,
    "freq_dim": 32,
    "base_grid": 4,
}


def narrow_config(micro_batch: int = 2):
    return build_config(
        {
            "preset": "XL",
            "model": NARROW,
            "stage": {
                "resolution": 64,
                "mask_ratio": 0.75,
                "micro_batch": micro_batch,
                "global_batch": micro_batch,
                "grad_clip": 0.25,
            },
        }
    )


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def phase_medians(step_phases, warmup: int, steps: int) -> dict[str, float]:
    """step_phases() -> {phase: seconds}; the median ms of every phase over the timed steps."""
    for _ in range(warmup):
        step_phases()
    runs = [step_phases() for _ in range(steps)]
    medians = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
    medians["step"] = 1e3 * statistics.median(sum(r.values()) for r in runs)
    return medians


def phased(forward, backward, optimizer_step):
    """A step that times its three phases: () -> {phase: seconds}."""
    return lambda: {"forward": timed(forward), "backward": timed(backward), "optimizer": timed(optimizer_step)}


def plain_phases(cfg, batch, flat: bool = False):
    """The plain step; ``flat``: gradients in one buffer, all-reduced and clipped whole (sedit.flat_grads)."""
    net = build_model(cfg.model)
    model = EDMPrecond(net, cfg.diffusion.sigma_data)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-4, fused=True)
    loss_fn, state = EDMLoss.from_config(cfg), {}

    def forward():
        state["loss"] = loss_fn(model, *batch, cfg.stage.mask_ratio)

    if flat:
        grads = FlatGradients(model.parameters())

        def optimizer_step():
            grads.step(opt, cfg.stage.grad_clip)
    else:

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.stage.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return phased(forward, lambda: state["loss"].backward(), optimizer_step), sum(1 for _ in net.parameters())


def deepspeed_phases(cfg, batch, ds_path: str):
    from sedit.engine import build_engine, load_ds_config, resolve_ds_config

    ds = resolve_ds_config(load_ds_config(ds_path), cfg, 1, ep_size=1)
    ds["bf16"] = {"enabled": False}  # the plain step's fp32 arithmetic; ZeRO's loops are the same code
    engine, _ = build_engine(cfg, ds)
    loss_fn, state = EDMLoss.from_config(cfg), {}

    def forward():
        state["loss"] = loss_fn(engine, *batch, cfg.stage.mask_ratio)

    step = phased(forward, lambda: engine.backward(state["loss"]), engine.step)
    return step, sum(1 for _ in engine.module.parameters())


def random_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    side = cfg.stage.resolution // cfg.stage.latent_downsample
    n = cfg.stage.micro_batch
    return torch.randn(n, 4, side, side), torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim)


def start_single_process() -> None:
    """One gloo process on the CPU, as DeepSpeed's engine needs a process group."""
    with socket.socket() as probe:  # a free port for this process's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


PLAIN, FLAT = "plain", "flat"
SETUP_NAMES = {PLAIN: "plain PyTorch, fused AdamW", FLAT: "plain PyTorch, flat gradient buffer, fused AdamW"}


def time_one(setup: str, warmup: int, steps: int) -> dict:
    """Time one set-up (``plain`` or a DeepSpeed config path) in this process."""
    start_single_process()
    cfg = narrow_config()
    torch.manual_seed(0)
    batch = random_batch(cfg)
    if setup in SETUP_NAMES:
        name, (step, tensors) = SETUP_NAMES[setup], plain_phases(cfg, batch, flat=setup == FLAT)
    else:
        name, (step, tensors) = f"deepspeed {Path(setup).name} ep=1", deepspeed_phases(cfg, batch, setup)
    row = {"setup": name, "parameter_tensors": tensors, **phase_medians(step, warmup, steps)}
    return row | {"torch": torch.__version__}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds", nargs="*", default=[], help="DeepSpeed configs to time beside the plain step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one set-up, in this process
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(time_one(args.only, args.warmup, args.steps)), flush=True)
        return []
    # every set-up in a process of its own: after a ZeRO-3 engine, later set-ups in the same process ran slower
    rows = []
    for setup in [PLAIN, FLAT, *args.ds]:
        command = [sys.executable, __file__, "--only", setup, "--warmup", str(args.warmup), "--steps", str(args.steps)]
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not lines:
            raise SystemExit(f"host_overhead: {setup} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    print(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    plain = rows[0]["step"]
    lines = [
        "| setup | parameter tensors | forward ms | backward ms | optimizer step ms | step ms | vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['parameter_tensors']} | {r['forward']:.1f} | {r['backward']:.1f} | "
            f"{r['optimizer']:.1f} | {r['step']:.1f} | {r['step'] - plain:+.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
