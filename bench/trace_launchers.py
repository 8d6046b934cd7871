"""Which host operator launched the GPU time of some kernels: a Chrome trace kept by
``bench/train_step.py --breakdown --trace DIR`` (plain or .gz), kernels picked by name.

    python bench/trace_launchers.py trace-stage2-rank0.json.gz direct_copy indexFunc reduce_kernel

Each kernel is tied to its launch (the runtime call with the same correlation id), and the launch to
the host operators that enclose it on its thread; kernel time is summed per (kernel, innermost
operators) and printed largest first, in ms per profiled window.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def enclosing_ops(launch: dict, host_ops: list[dict], depth: int) -> tuple[str, ...]:
    """Names of the host operators around a launch on its thread, outermost first, last ``depth``."""
    start, end = launch["ts"], launch["ts"] + launch.get("dur", 0)
    around = [op for op in host_ops if op["ts"] <= start and op["ts"] + op["dur"] >= end]
    around.sort(key=lambda op: -op["dur"])
    return tuple(op["name"][:80] for op in around[-depth:])


def launchers(events: list[dict], patterns: list[str], depth: int = 3) -> list[tuple[str, tuple, int, float]]:
    """(kernel name, enclosing host operators, launches, summed µs) for kernels whose name holds a pattern."""
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCH_CATEGORIES and "args" in e}
    host_ops: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES and e.get("ph") == "X":
            host_ops[e["tid"]].append(e)
    total: dict[tuple, float] = defaultdict(float)
    count: dict[tuple, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "kernel" or not any(p in e["name"] for p in patterns):
            continue
        launch = launches.get(e.get("args", {}).get("correlation"))
        ops = enclosing_ops(launch, host_ops[launch["tid"]], depth) if launch else ("(launch not recorded)",)
        key = (e["name"][:60], ops)
        total[key] += e.get("dur", 0.0)
        count[key] += 1
    rows = [(name, ops, count[(name, ops)], us) for (name, ops), us in total.items()]
    return sorted(rows, key=lambda row: -row[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("patterns", nargs="+", help="substrings of kernel names")
    parser.add_argument("--depth", type=int, default=3, help="innermost host operators shown")
    args = parser.parse_args()
    print("| ms | launches | kernel | host operators (outer > inner) |\n|---|---|---|---|")
    for name, ops, launches_, us in launchers(load_events(args.trace), args.patterns, args.depth):
        print(f"| {us / 1e3:.2f} | {launches_} | `{name}` | {' > '.join(ops)} |")


if __name__ == "__main__":
    main()
