"""Train one stage, on DeepSpeed's engine or the flat one (the ``--ds`` config says which).

    deepspeed launch/stage.py --config configs/xl/stage1.yaml --ds ds_configs/zero3.json --out runs/xl/stage1
    deepspeed --num_gpus 2 launch/stage.py --config ... --ds ds_configs/zero2_ep.json --ep 2
    deepspeed --num_gpus 8 launch/stage.py --config ... --ds ds_configs/flat_dp.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/stage.py ...          (CPU, gloo; tests)

The expert-parallel size comes from the DeepSpeed config (``expert_parallel.autoep_size``) unless
``--ep`` overrides it. Unsupported layouts are refused before any process group is created.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sedit.config import ConfigError  # noqa: E402
from sedit.engine import TopologyError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (preset + stage settings)")
    parser.add_argument(
        "--ds", required=True, help="engine config: ds_configs/flat_dp.json, or DeepSpeed's zero3.json, zero2_ep.json"
    )
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (overrides the DeepSpeed config)")
    parser.add_argument("--out", default=None, help="run directory (default runs/<stage name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stage.lr=1e-4")
    parser.add_argument("--resume", default="auto", help="'auto' (newest checkpoint in the run dir, if any) or 'none'")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configs and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sedit.distributed import apply_launcher_env

    apply_launcher_env(args.local_rank)
    from sedit.train import DIVERGED_EXIT, DivergedError, run_stage

    try:
        return run_stage(args)
    except (ConfigError, TopologyError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT


def exit_now(code: int) -> None:
    """End the process once the stage has returned: everything is written and the process group is
    destroyed, but letting the interpreter finalise can still abort a rank (gloo's worker threads
    torn down after Python, "terminate called without an active exception", seen once on the CPU)
    and turn a finished stage into a failed one for the launcher. So flush and leave without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # the C libraries' buffered output (NCCL's log, when sent to a file)
    except (OSError, AttributeError):
        pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
