"""Training-step throughput: full steps (EDM loss, backward, optimizer) on random latents and captions.

    python bench/train_step.py --preset XL --stages 1 2 3 4                     # one GPU, plain PyTorch
    python bench/train_step.py --preset XL --stages 1 --compile                 # with torch.compile
    deepspeed --num_gpus 2 bench/train_step.py --preset XL --ds ds_configs/zero3.json --stages 1 2

Per stage: warm-up, then the median of CUDA-event step times, images/s (per GPU and total), peak
memory, analytic model FLOPs per image (sedit.flops) and MFU against a bf16 matmul ceiling measured
in the same run. One JSON line per stage, then a markdown table. Stage settings (resolution, mask
ratio, micro-batch) follow the reference measurements of DESIGN.md §5 unless --micro-batch is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedit import distributed  # noqa: E402
from sedit.config import build_config  # noqa: E402
from sedit.edm import EDMLoss, EDMPrecond  # noqa: E402
from sedit.flops import train_flops_per_image  # noqa: E402
from sedit.model import build_model  # noqa: E402

STAGES = {1: (256, 0.75, 128), 2: (256, 0.0, 64), 3: (512, 0.75, 32), 4: (512, 0.0, 16)}


def matmul_ceiling(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul rate (FLOP/s) on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def stage_config(preset: str, stage: int, micro_batch: int | None, world: int):
    res, mask, mb = STAGES[stage]
    mb = micro_batch or mb
    return build_config(
        {
            "preset": preset,
            "stage": {
                "name": f"bench-stage{stage}",
                "resolution": res,
                "mask_ratio": mask,
                "micro_batch": mb,
                "global_batch": mb * world,
                "data": "synthetic",
                "grad_clip": 0.25,
            },
        }
    )


def make_step(cfg, args, device):
    """A closure running one full training step, and a description of the set-up."""
    loss_fn = EDMLoss(cfg.diffusion.p_mean, cfg.diffusion.p_std, cfg.diffusion.sigma_data, cfg.model.patch_size)
    side = cfg.stage.resolution // cfg.stage.latent_downsample
    n = cfg.stage.micro_batch
    latents = torch.randn(n, 4, side, side, device=device) * 0.9
    captions = torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim, device=device)
    mask = cfg.stage.mask_ratio
    if args.ds:
        from sedit.engine import build_engine, load_ds_config, resolve_ds_config

        ds = resolve_ds_config(load_ds_config(args.ds), cfg, distributed.world_size(), args.ep)
        engine, _ = build_engine(cfg, ds)
        if args.compile:
            engine.compile()

        def step():
            loss = loss_fn(engine, latents.bfloat16(), captions.bfloat16(), mask)
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return step, f"deepspeed {Path(args.ds).name} ep={ds['expert_parallel']['autoep_size']}"

    torch.manual_seed(0)
    net = build_model(cfg.model).to(device)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data)
    model = torch.compile(precond) if args.compile else precond
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, latents, captions, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.stage.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, "single GPU, bf16 autocast, fused AdamW" + (", torch.compile" if args.compile else "")


def peak_memory_per_rank(device) -> list[float]:
    """Peak allocated GiB of every rank (expert-parallel ranks hold different experts)."""
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    if not torch.distributed.is_initialized():
        return [peak.item()]
    gathered = [torch.empty_like(peak) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, peak)
    return [round(t.item(), 2) for t in gathered]


def bench_stage(stage: int, args, device, ceiling: float) -> dict:
    world = distributed.world_size()
    cfg = stage_config(args.preset, stage, args.micro_batch, world)
    torch.cuda.reset_peak_memory_stats(device)
    tic = time.time()
    step, setup = make_step(cfg, args, device)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - tic
    times = []
    losses = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step())
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(times)
    peaks = peak_memory_per_rank(device)
    flops = train_flops_per_image(cfg.model, cfg.stage.resolution // 8, cfg.stage.mask_ratio)
    per_gpu = cfg.stage.micro_batch / median
    return {
        "preset": args.preset,
        "stage": stage,
        "resolution": cfg.stage.resolution,
        "mask_ratio": cfg.stage.mask_ratio,
        "micro_batch": cfg.stage.micro_batch,
        "world_size": world,
        "setup": setup,
        "step_s_median": median,
        "step_s_min": min(times),
        "images_per_s_per_gpu": per_gpu,
        "images_per_s_total": per_gpu * world,
        "train_gflop_per_image": flops / 1e9,
        "mfu": per_gpu * flops / ceiling,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "peak_memory_gib": max(peaks),
        "peak_memory_gib_per_rank": peaks,
        "warmup_and_compile_s": warm_s,
        "final_loss": float(losses[-1]),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device),
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| stage | res | mask | micro-batch | GPUs | setup | step ms | img/s/GPU | GFLOP/img | MFU | peak GiB by rank |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['resolution']} | {r['mask_ratio']} | {r['micro_batch']} | {r['world_size']} | "
            f"{r['setup']} | {1e3 * r['step_s_median']:.1f} | {r['images_per_s_per_gpu']:.0f} | "
            f"{r['train_gflop_per_image']:.0f} | {100 * r['mfu']:.1f}% | "
            + " / ".join(f"{gib:.1f}" for gib in r["peak_memory_gib_per_rank"])
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=sorted(STAGES))
    parser.add_argument("--micro-batch", type=int, default=None, help="override the per-stage micro-batch")
    parser.add_argument("--ds", default=None, help="DeepSpeed config; run under the deepspeed launcher")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (DeepSpeed runs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", default=None, help="append JSON lines here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(argv)
    distributed.apply_launcher_env(args.local_rank)
    device = distributed.start() if args.ds else distributed.device()
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    ceiling = matmul_ceiling(device)
    rows = []
    for stage in args.stages:
        row = bench_stage(stage, args, device, ceiling)
        rows.append(row)
        distributed.print0(json.dumps(row))
        if args.json and distributed.is_main():
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()
    distributed.print0(markdown(rows))


if __name__ == "__main__":
    main()
