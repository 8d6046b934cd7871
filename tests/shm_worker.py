"""Started by tests/test_launch.py under ``deepspeed --num_gpus 2`` on the CPU: joins the process group
as the trainer does, runs one all-reduce, and records whether this rank's shared-memory all-reduce
buffer exists before and after ``distributed.stop()``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sedit import distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.apply_launcher_env(args.local_rank)
    distributed.start()
    rank = distributed.rank()
    total = torch.full((4,), float(rank + 1))
    torch.distributed.all_reduce(total)
    buffer = distributed.cpu_allreduce_buffer()
    existed = buffer.exists()
    distributed.stop()
    record = {"buffer": str(buffer), "existed": existed, "exists_after": buffer.exists(), "sum": total.tolist()}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
