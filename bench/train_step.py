"""Training-step throughput: full steps (EDM loss, backward, optimizer) on random latents and captions.

    python bench/train_step.py --preset XL --stages 1 2 3 4                     # one GPU, plain PyTorch
    python bench/train_step.py --preset XL --stages 1 --compile                 # with torch.compile
    python bench/train_step.py --preset XL --stages 2 --compile reduce-overhead # ... and CUDA graphs
    deepspeed --num_gpus 2 bench/train_step.py --preset XL --ds ds_configs/zero3.json --stages 1 2
    torchrun --nproc_per_node 2 bench/train_step.py --preset XL --dp --stages 1 --compile reduce-overhead
    deepspeed --num_gpus 4 bench/train_step.py --ds ds_configs/zero2_ep.json --ep 4 \
        --global-batch 2048 --warmup 1 --steps 3 --breakdown --moe-load   # the recipe's batch

Per stage: warm-up, then the median of CUDA-event step times, images/s (per GPU and total), peak
memory, analytic model FLOPs per image (sedit.flops) and MFU against a bf16 matmul ceiling measured
in the same run. One JSON line per stage, then a markdown table. Stage settings (resolution, mask
ratio, micro-batch) follow the reference measurements of DESIGN.md §5 unless --micro-batch is given.

A step is one optimizer step. With --global-batch it accumulates gradients over
global / (micro-batch x GPUs) micro-batches, as training does; every micro-step is timed too (the
last one of a step also clips and steps the optimizer; ZeRO-2/3 reduce gradients in every one).
--breakdown profiles one more step and splits its GPU time into compute, exposed all-to-all,
exposed ZeRO collectives and idle (bench/step_breakdown.py), for every rank; --moe-load reports each
MoE layer's expert load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_breakdown import kinds_markdown, profile_breakdown  # noqa: E402
from step_breakdown import markdown as breakdown_markdown  # noqa: E402

from sedit import distributed  # noqa: E402
from sedit.config import build_config  # noqa: E402
from sedit.edm import EDMLoss, EDMPrecond  # noqa: E402
from sedit.flat_grads import FlatGradients, clipped_step  # noqa: E402
from sedit.flops import forward_flops_per_image, train_flops_per_image  # noqa: E402
from sedit.metrics import forget_routing, moe_layers  # noqa: E402
from sedit.model import build_model  # noqa: E402
from sedit.moe.routing import expert_load, routing_stats  # noqa: E402

MOE_SCALARS = ("router_entropy", "dropped_fraction", "experts_per_token")

STAGES = {1: (256, 0.75, 128), 2: (256, 0.0, 64), 3: (512, 0.75, 32), 4: (512, 0.0, 16)}
# reduce-overhead and max-autotune capture CUDA graphs
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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


def stage_config(preset: str, stage: int, micro_batch: int | None, world: int, global_batch: int | None = None):
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
                "global_batch": global_batch or mb * world,
                "data": "synthetic",
                "grad_clip": 0.25,
            },
        }
    )


@dataclass
class Runner:
    """One set-up's training step, split into micro-steps (gradient accumulation)."""

    micro_step: Callable[[bool], torch.Tensor]  # runs one micro-batch; True on the last of a step
    accumulation: int  # micro-steps per optimizer step
    setup: str
    model: torch.nn.Module  # the EDM-preconditioned model (the engine's module under DeepSpeed)
    forward_loss: Callable[[], torch.Tensor]  # one loss evaluation, for statistics

    def step(self) -> torch.Tensor:
        for i in range(self.accumulation):
            loss = self.micro_step(i == self.accumulation - 1)
        return loss


def make_step(cfg, args, device) -> Runner:
    """Full training steps (split into micro-steps) of one set-up on random latents and captions."""
    loss_fn = EDMLoss.from_config(cfg)
    side = cfg.stage.resolution // cfg.stage.latent_downsample
    n = cfg.stage.micro_batch
    latents = torch.randn(n, 4, side, side, device=device) * 0.9
    captions = torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim, device=device)
    mask = cfg.stage.mask_ratio
    world = distributed.world_size()
    accumulation = cfg.stage.accumulation(world)
    if args.ds:
        from sedit.engine import build_engine, load_ds_config, resolve_ds_config

        ds = resolve_ds_config(load_ds_config(args.ds), cfg, world, args.ep)
        engine, _ = build_engine(cfg, ds)
        engine.module.net.use_grid(side // cfg.model.patch_size)
        if args.compile:
            engine.compile(compile_kwargs={"mode": args.compile})

        def ds_loss():
            return loss_fn(engine, latents.bfloat16(), captions.bfloat16(), mask)

        def ds_micro_step(last: bool):
            loss = ds_loss()
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            engine.step()  # steps the optimizer only at the accumulation boundary
            return loss.detach()

        setup = f"deepspeed {Path(args.ds).name} ep={ds['expert_parallel']['autoep_size']}" + setup_suffix(args)
        return Runner(ds_micro_step, accumulation, setup, engine.module, ds_loss)

    torch.manual_seed(0)
    net = build_model(cfg.model).to(device)
    net.use_grid(side // cfg.model.patch_size)  # outside the compiled forward
    precond = EDMPrecond(net, cfg.diffusion.sigma_data)
    model = torch.compile(precond, mode=args.compile) if args.compile else precond
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def plain_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_fn(model, latents, captions, mask)

    if args.dp:
        grads = FlatGradients(net.parameters())
        scale = grads.loss_scale(accumulation)

        def end_of_step():
            grads.step(opt, cfg.stage.grad_clip)

        setup = "data parallel, one flat all-reduce, bf16 autocast, fused AdamW" + setup_suffix(args)
    else:
        scale = 1 / accumulation
        if accumulation > 1:  # gradients accumulate in buffers of their own, not in a CUDA graph's reused outputs
            for p in net.parameters():
                p.grad = torch.zeros_like(p)

        def end_of_step():
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            clipped_step(opt, grads, cfg.stage.grad_clip)  # the clipping factor rides on the fused AdamW's reads
            opt.zero_grad(set_to_none=accumulation == 1)

        setup = "single GPU, bf16 autocast, fused AdamW" + setup_suffix(args)

    def plain_micro_step(last: bool):
        loss = plain_loss()
        (loss * scale).backward()
        if last:
            end_of_step()
        return loss.detach()

    return Runner(plain_micro_step, accumulation, setup, precond, plain_loss)


def setup_suffix(args) -> str:
    """What a row's ``setup`` adds for compiling and kernel choices (rows are matched by setup later)."""
    suffix = ""
    if args.compile:
        suffix += f", torch.compile {args.compile}" + "".join(f", {option}" for option in args.inductor)
    if args.sdpa:
        suffix += f", {args.sdpa} SDPA only"
    return suffix


SDPA_SWITCHES = {
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "flash": torch.backends.cuda.enable_flash_sdp,
}


def restrict_sdpa(name: str | None) -> None:
    """Leave only one fused SDPA kernel family enabled (None: PyTorch's own choice, cuDNN on Hopper)."""
    if name:
        for key, switch in SDPA_SWITCHES.items():
            switch(key == name)


def apply_setup_options(args, parser: argparse.ArgumentParser) -> None:
    """Put the --inductor and --sdpa choices of ``add_setup_arguments`` into effect, before any compiling."""
    apply_inductor_options(args.inductor, parser)
    restrict_sdpa(args.sdpa)


def apply_inductor_options(options: list[str], parser: argparse.ArgumentParser) -> None:
    """Set ``torch._inductor.config`` entries from KEY=VALUE texts (dotted keys for sub-sections)."""
    import ast

    import torch._inductor.config as inductor_config

    for text in options:
        key, sep, raw = text.partition("=")
        *sections, name = key.split(".")
        owner = inductor_config
        for section in sections:
            owner = getattr(owner, section, None)
        if not sep or owner is None or not hasattr(owner, name):
            parser.error(f"--inductor {text!r}: expected KEY=VALUE with KEY an option of torch._inductor.config")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a plain string such as ATEN,TRITON
        setattr(owner, name, value)


def time_steps(runner: Runner, steps: int) -> tuple[list[float], list[float], list[float], torch.Tensor]:
    """Seconds per optimizer step, per inner micro-step and per boundary micro-step (CUDA events),
    and the last micro-step's loss."""
    step_s, inner_s, boundary_s = [], [], []
    for _ in range(steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(runner.accumulation + 1)]
        marks[0].record()
        for i in range(runner.accumulation):
            loss = runner.micro_step(i == runner.accumulation - 1)
            marks[i + 1].record()
        torch.cuda.synchronize()
        micro = [a.elapsed_time(b) / 1e3 for a, b in zip(marks[:-1], marks[1:], strict=True)]
        step_s.append(sum(micro))
        inner_s.extend(micro[:-1])
        boundary_s.append(micro[-1])
    return step_s, inner_s, boundary_s, loss


@torch.no_grad()
def moe_load(runner: Runner) -> list[dict]:
    """Expert load of every MoE layer for one forward, summed (tokens) or averaged over ranks."""
    runner.forward_loss()
    rows = []
    for name, layer in moe_layers(runner.model):
        load, stats = expert_load(layer.last_routing), routing_stats(layer.last_routing)
        tokens = load["tokens"].double()  # (E,) summed over ranks
        importance = load["importance"].double()  # (E,) averaged over ranks (equal micro-batches)
        scalars = torch.stack([stats[k].double() for k in MOE_SCALARS])  # averaged over ranks
        if torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for tensor in (tokens, importance, scalars):
                torch.distributed.all_reduce(tensor)
            importance /= world
            scalars /= world
        rows.append(
            {
                "layer": name,
                "tokens_per_expert_min": tokens.min().item(),
                "tokens_per_expert_max": tokens.max().item(),
                "importance_max_over_min": (importance.max() / importance.min()).item(),
                "importance_cv": (importance.std(correction=0) / importance.mean()).item(),
                **{key: value.item() for key, value in zip(MOE_SCALARS, scalars, strict=True)},
            }
        )
    forget_routing(runner.model)
    return rows


def peak_memory_per_rank(device) -> list[float]:
    """Peak allocated GiB of every rank (expert-parallel ranks hold different experts)."""
    return [round(gib, 2) for gib in distributed.gather_objects(torch.cuda.max_memory_allocated(device) / 2**30)]


def bench_stage(stage: int, args, device, ceiling: float) -> dict:
    world = distributed.world_size()
    cfg = stage_config(args.preset, stage, args.micro_batch, world, args.global_batch)
    torch.cuda.reset_peak_memory_stats(device)
    tic = time.time()
    runner = make_step(cfg, args, device)
    for _ in range(args.warmup):
        runner.step()
    torch.cuda.synchronize()
    warm_s = time.time() - tic
    step_s, inner_s, boundary_s, loss = time_steps(runner, args.steps)
    median = statistics.median(step_s)
    peaks = peak_memory_per_rank(device)
    flops = train_flops_per_image(cfg.model, cfg.stage.resolution // 8, cfg.stage.mask_ratio)
    images_per_step = cfg.stage.micro_batch * runner.accumulation
    per_gpu = images_per_step / median
    row = {
        "preset": args.preset,
        "stage": stage,
        "resolution": cfg.stage.resolution,
        "mask_ratio": cfg.stage.mask_ratio,
        "micro_batch": cfg.stage.micro_batch,
        "global_batch": cfg.stage.global_batch,
        "accumulation": runner.accumulation,
        "world_size": world,
        "setup": runner.setup,
        "step_s_median": median,
        "step_s_min": min(step_s),
        "steps_timed": len(step_s),
        "micro_step_s_median": statistics.median(inner_s) if inner_s else None,
        "boundary_micro_step_s_median": statistics.median(boundary_s),
        "images_per_s_per_gpu": per_gpu,
        "images_per_s_total": per_gpu * world,
        "train_gflop_per_image": flops / 1e9,
        "mfu": per_gpu * flops / ceiling,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "peak_memory_gib": max(peaks),
        "peak_memory_gib_per_rank": peaks,
        "warmup_and_compile_s": warm_s,
        "final_loss": float(loss),
        "torch": torch.__version__,
        "deepspeed": deepspeed_version(),
        "gpu": torch.cuda.get_device_name(device),
    }
    if args.breakdown:
        trace = Path(args.trace) / f"trace-stage{stage}-rank{distributed.rank()}.json" if args.trace else None
        parts = distributed.gather_objects(profile_breakdown(runner.step, 1, trace))
        row["breakdown_per_rank"] = parts
        matmul_ms = parts[0]["compute_by_kind_ms"].get("matmul")
        if matmul_ms:  # the rate of the matmul kernels alone (attention products are not in them)
            side = cfg.stage.resolution // cfg.stage.latent_downsample
            matmul_flops = 3 * forward_flops_per_image(cfg.model, side, cfg.stage.mask_ratio, attention=False)
            row["matmul_kernel_tflops"] = images_per_step * matmul_flops / (matmul_ms / 1e3) / 1e12
    if args.moe_load:
        row["moe_load"] = moe_load(runner)
    return row


def deepspeed_version() -> str | None:
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


def markdown(rows: list[dict]) -> str:
    head = (
        "| stage | res | mask | micro-batch x accumulation | GPUs | setup | step ms | img/s/GPU | img/s total "
        "| GFLOP/img | MFU | peak GiB by rank |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['resolution']} | {r['mask_ratio']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{r['world_size']} | {r['setup']} | {1e3 * r['step_s_median']:.1f} | {r['images_per_s_per_gpu']:.0f} | "
            f"{r['images_per_s_total']:.0f} | {r['train_gflop_per_image']:.0f} | {100 * r['mfu']:.1f}% | "
            + " / ".join(f"{gib:.1f}" for gib in r["peak_memory_gib_per_rank"])
            + " |"
        )
    return "\n".join(lines)


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a set-up (make_step): DeepSpeed, flat data parallelism, compiling."""
    parser.add_argument("--ds", default=None, help="DeepSpeed config; run under the deepspeed launcher")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (DeepSpeed runs)")
    parser.add_argument(
        "--dp",
        action="store_true",
        help="plain PyTorch with every gradient in one flat buffer, all-reduced once per step (sedit.flat_grads); "
        "under torchrun or another launcher: data parallel over its processes; alone: one GPU",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the model, in this mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --compile: set a torch._inductor.config option first (e.g. coordinate_descent_tuning=True)",
    )
    parser.add_argument(
        "--sdpa", default=None, choices=sorted(SDPA_SWITCHES), help="allow only this fused SDPA kernel family"
    )
    parser.add_argument("--local_rank", type=int, default=-1)


def start_device(args, parser: argparse.ArgumentParser) -> torch.device:
    """This rank's GPU. DeepSpeed set-ups join the launcher's process group; --dp joins it only when a
    launcher started several processes (WORLD_SIZE set), else it runs alone."""
    if args.ds and args.dp:
        parser.error("--dp is plain PyTorch data parallelism; it does not combine with --ds")
    distributed.apply_launcher_env(args.local_rank)
    if args.ds or (args.dp and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return distributed.start()
    return distributed.device()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=sorted(STAGES))
    parser.add_argument("--micro-batch", type=int, default=None, help="override the per-stage micro-batch")
    add_setup_arguments(parser)
    parser.add_argument("--global-batch", type=int, default=None, help="accumulate to this batch (all GPUs)")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps timed")
    parser.add_argument("--breakdown", action="store_true", help="profile one step: compute vs communication")
    parser.add_argument("--moe-load", action="store_true", help="expert load of every MoE layer")
    parser.add_argument("--trace", default=None, help="with --breakdown: keep each rank's Chrome trace in this folder")
    parser.add_argument("--json", default=None, help="append JSON lines here (rank 0)")
    args = parser.parse_args(argv)
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    apply_setup_options(args, parser)
    device = start_device(args, parser)
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
    if args.breakdown:
        distributed.print0(breakdown_markdown(rows))
        distributed.print0(kinds_markdown(rows))
    distributed.stop()  # left to interpreter exit, NCCL's teardown can hang


if __name__ == "__main__":
    main()
