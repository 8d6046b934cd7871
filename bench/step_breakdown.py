"""Where a training step's GPU time goes: compute, expert all-to-all, ZeRO collectives, or nothing.

From the GPU activity the profiler records (kernels, copies, memsets of this rank's device), each
kernel is put in one class by its name:

    all_to_all   NCCL send/receive kernels: the expert-parallel all-to-all (``all_to_all_single``);
    collectives  every other NCCL kernel: ZeRO's all-gathers, reduce-scatters, all-reduces;
    compute      everything else (matmuls, attention, elementwise, the optimizer, copies).

Communication runs on its own streams and overlaps compute, so the classes are measured as unions
of time intervals and the step's GPU window splits into four parts that add up to it:

    window = compute + exposed all-to-all + exposed collectives + idle

``exposed`` is communication time during which no compute kernel ran (for collectives: no compute
and no all-to-all); ``idle`` is time with nothing on the GPU, which is the host failing to keep it
fed (Python, hooks, launches). An NCCL kernel's time includes waiting for the slowest peer.

Compute is split further by kernel kind (``compute_kind``), as summed kernel time per step: matmuls,
attention, the optimizer and gradient clipping, routing/indexing (top-k, gathers, scatters), fused
elementwise kernels that torch.compile generated (Triton), and other elementwise work and copies.
Against the model's FLOPs the matmul time gives the rate the matmul kernels themselves reach.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_class(name: str) -> str:
    """'all_to_all', 'collectives' or 'compute' for one GPU activity's name."""
    lowered = name.lower()
    if "nccl" not in lowered:
        return "compute"
    if "sendrecv" in lowered or "alltoall" in lowered:
        return "all_to_all"
    return "collectives"


# Checked in this order: an attention kernel's name may also hold "cutlass" or "sm90", a fused
# optimizer's "multi_tensor_apply" also names the clipping norms (which belong with it).
COMPUTE_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),  # cuDNN's SDPA backward has helper kernels
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("optimizer and clipping", ("adam", "multi_tensor_apply")),
    ("routing and indexing", ("topk", "sort", "radix", "scatter", "gather", "index")),
    ("fused elementwise (compiled)", ("triton",)),
)


def compute_kind(name: str) -> str:
    """The kind of one compute kernel, by name; 'other elementwise and copies' if none matches."""
    lowered = name.lower()
    for kind, markers in COMPUTE_KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return "other elementwise and copies"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def breakdown(trace_events: list[dict], steps: int = 1, top: int = 25) -> dict:
    """Milliseconds per step of each part of the GPU window, from Chrome-trace events (µs); also compute
    time per kernel kind and the ``top`` compute kernels by summed time (names cut to 160 characters)."""
    spans: dict[str, list[tuple[float, float]]] = {"compute": [], "all_to_all": [], "collectives": []}
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for event in trace_events:
        if event.get("ph") != "X" or event.get("cat") not in GPU_CATEGORIES:
            continue
        name, start, length = event.get("name", ""), float(event["ts"]), float(event.get("dur", 0.0))
        kind = kernel_class(name)
        spans[kind].append((start, start + length))
        if kind == "compute":
            sub = compute_kind(name)
            by_kind[sub] = by_kind.get(sub, 0.0) + length
            by_name[name] = by_name.get(name, 0.0) + length
    every = [span for kind in spans.values() for span in kind]
    if not every:
        raise ValueError("no GPU activity in the trace: was the profiler recording CUDA?")
    window = max(end for _, end in every) - min(start for start, _ in every)
    compute = union_length(spans["compute"])
    compute_or_a2a = union_length(spans["compute"] + spans["all_to_all"])
    busy = union_length(every)
    ms = 1e-3 / steps
    return {
        "window_ms": window * ms,
        "compute_ms": compute * ms,
        "all_to_all_ms": union_length(spans["all_to_all"]) * ms,
        "collectives_ms": union_length(spans["collectives"]) * ms,
        "exposed_all_to_all_ms": (compute_or_a2a - compute) * ms,
        "exposed_collectives_ms": (busy - compute_or_a2a) * ms,
        "idle_ms": (window - busy) * ms,
        "kernels": len(every) / steps,
        "compute_by_kind_ms": {kind: total * ms for kind, total in largest_first(by_kind)},
        "top_kernels_ms": {name[:160]: total * ms for name, total in largest_first(by_name)[:top]},
    }


def largest_first(totals: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(totals.items(), key=lambda item: -item[1])


def profile_breakdown(run_steps: Callable[[], None], steps: int, keep_trace: Path | None = None) -> dict:
    """Profile ``run_steps`` (which runs ``steps`` training steps) and break its GPU time down.
    With ``keep_trace`` the host's operators are recorded too and the Chrome trace is kept there."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if keep_trace else [])
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        run_steps()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(keep_trace or Path(tmp) / "trace.json")
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return breakdown(events, steps)


def markdown(rows: list[dict]) -> str:
    """One table row per (setup, rank) with a breakdown."""
    head = (
        "| stage | GPUs | setup | rank | step window ms | compute | exposed all-to-all | exposed ZeRO collectives "
        "| GPU idle | all-to-all total | collectives total |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        for rank, part in enumerate(row.get("breakdown_per_rank") or []):
            lines.append(
                f"| {row['stage']} | {row['world_size']} | {row['setup']} | {rank} | {part['window_ms']:.0f} | "
                f"{part['compute_ms']:.0f} | {part['exposed_all_to_all_ms']:.0f} | "
                f"{part['exposed_collectives_ms']:.0f} | {part['idle_ms']:.0f} | {part['all_to_all_ms']:.0f} | "
                f"{part['collectives_ms']:.0f} |"
            )
    return "\n".join(lines)


def kinds_markdown(rows: list[dict]) -> str:
    """Rank 0's compute time per kernel kind, one row per set-up (ms per step and share of compute)."""
    kinds = [kind for kind, _ in COMPUTE_KINDS] + ["other elementwise and copies"]
    lines = ["| stage | setup | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
    for row in rows:
        parts = row.get("breakdown_per_rank")
        if not parts:
            continue
        by_kind = parts[0]["compute_by_kind_ms"]
        total = sum(by_kind.values()) or 1.0
        cells = [f"{by_kind.get(kind, 0.0):.1f} ({100 * by_kind.get(kind, 0.0) / total:.0f}%)" for kind in kinds]
        lines.append(f"| {row['stage']} | {row['setup']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
