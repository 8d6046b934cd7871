"""Where a training step's GPU time goes: torch.profiler over a few steps, top kernels by CUDA time.

python bench/profile_step.py --preset XL --stage 1 [--compile [MODE]] [--rows 30] [--trace out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import (  # noqa: E402
    add_setup_arguments,
    apply_setup_options,
    make_step,
    stage_config,
    start_device,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    add_setup_arguments(parser)
    args = parser.parse_args()
    apply_setup_options(args, parser)
    device = start_device(args, parser)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    cfg = stage_config(args.preset, args.stage, args.micro_batch, world)
    runner = make_step(cfg, args, device)
    for _ in range(4):
        runner.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.step()
        torch.cuda.synchronize()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"# {runner.setup}, stage {args.stage}, 3 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
