"""Projected time and cost of the full four-stage XL recipe from measured training-step throughput.

    python3 bench/cost_projection.py docs/bench-raw/2026-11-27-2xh200-ep2.jsonl \\
        --setup "deepspeed zero2_ep.json ep=2" --gpus 8 --price 2.0

For stage k of the recipe (``configs/xl/stage{k}.yaml``: steps S_k, global batch B):

    images_k     = S_k * B
    GPU-hours_k  = images_k / r_k / 3600        r_k: measured images/s per GPU of the chosen setup
    days_k       = GPU-hours_k / G / 24          on G GPUs
    cost_k       = GPU-hours_k * price

r_k is read from ``bench/train_step.py`` JSON lines (``--setup`` must equal a row's ``setup``; with
several matching rows for a stage, the last one in the order the files are given, so list them oldest
first; ``--micro-batch 1=256`` keeps only stage 1's rows of that micro-batch). The recipe's global batch
is what counts images; a row's micro-batch only says how the step was measured (with one optimizer
step per micro-batch unless the row accumulates). Using a per-GPU rate measured at W GPUs for G GPUs
assumes it holds at G: true for the purely data-parallel part, optimistic where communication grows
with G (ZeRO-3 gathers, the expert all-to-all).
A stage with no measurement is reported as such and the totals say they are partial.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sedit.config import load_config  # noqa: E402

RECIPE = [ROOT / "configs" / "xl" / f"stage{k}.yaml" for k in (1, 2, 3, 4)]


def json_lines(path: Path) -> Iterator[dict]:
    """Every non-blank line of a JSON-lines file, parsed; a broken line is named by file and number."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None


def measured_rates(
    paths: list[str], setup: str, gpu: str | None = None, micro_batches: dict[int, int] | None = None
) -> dict[int, dict]:
    """Stage -> the last row with this ``setup`` (and a ``gpu`` name containing ``gpu``; and, for the
    stages in ``micro_batches``, that micro-batch)."""
    micro_batches = micro_batches or {}
    rows: dict[int, dict] = {}
    for path in paths:
        for row in json_lines(Path(path)):
            if row.get("setup") != setup or (gpu is not None and gpu not in row.get("gpu", "")):
                continue
            stage = int(row["stage"])
            if stage in micro_batches and row.get("micro_batch") != micro_batches[stage]:
                continue
            rows[stage] = {**row, "source": Path(path).name}
    return rows


def project(rates: dict[int, dict], gpus: int, price: float) -> list[dict]:
    """One dict per recipe stage: images, the rate used, GPU-hours, days on ``gpus`` GPUs, cost."""
    plan = []
    for k, path in enumerate(RECIPE, 1):
        stage = load_config(path).stage
        images = stage.steps * stage.global_batch
        entry = {"stage": k, "steps": stage.steps, "global_batch": stage.global_batch, "images": images}
        if k in rates:
            rate = rates[k]["images_per_s_per_gpu"]
            gpu_hours = images / rate / 3600
            entry |= {
                "images_per_s_per_gpu": rate,
                "measured_on": f"micro-batch {rates[k].get('micro_batch', '?')}, {rates[k]['world_size']} x "
                f"{rates[k].get('gpu', '?')} ({rates[k]['source']})",
                "gpu_hours": gpu_hours,
                "days": gpu_hours / gpus / 24,
                "cost": gpu_hours * price,
            }
        plan.append(entry)
    return plan


def markdown(plan: list[dict], gpus: int, price: float, setup: str) -> str:
    lines = [
        f"Setup: {setup}; {gpus} GPUs at ${price:g}/GPU-hour.",
        "",
        f"| stage | steps x batch | images | img/s/GPU (measured on) | GPU-hours | days on {gpus} GPUs | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in plan:
        head = f"| {e['stage']} | {e['steps']:,} x {e['global_batch']:,} | {e['images'] / 1e6:.1f}M |"
        if "gpu_hours" in e:
            lines.append(
                f"{head} {e['images_per_s_per_gpu']:.0f} ({e['measured_on']}) | {e['gpu_hours']:.0f} | "
                f"{e['days']:.2f} | ${e['cost']:,.0f} |"
            )
        else:
            lines.append(f"{head} not measured | - | - | - |")
    done = [e for e in plan if "gpu_hours" in e]
    measured = ", ".join(str(e["stage"]) for e in done)
    partial = "" if len(done) == len(plan) else f" (stage{'s' if len(done) > 1 else ''} {measured} only)"
    hours, days, cost = (sum(e[key] for e in done) for key in ("gpu_hours", "days", "cost"))
    lines.append(f"| total{partial} | | | | {hours:.0f} | {days:.2f} | ${cost:,.0f} |")
    return "\n".join(lines)


def stage_micro_batch(text: str) -> tuple[int, int]:
    """'1=256' -> (1, 256), for the recipe's stages only."""
    stage, sep, size = text.partition("=")
    if not (sep and stage.strip().isdigit() and size.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected STAGE=MICRO_BATCH, e.g. 1=256")
    if not 1 <= int(stage) <= len(RECIPE):
        raise argparse.ArgumentTypeError(f"{text!r}: the recipe's stages are 1-{len(RECIPE)}")
    return int(stage), int(size)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench/train_step.py JSON-lines files, oldest first")
    parser.add_argument("--setup", required=True, help="a row's exact 'setup', e.g. 'deepspeed zero2_ep.json ep=2'")
    parser.add_argument("--gpu", default=None, help="only rows whose GPU name contains this (e.g. H100)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the projected run")
    parser.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")
    parser.add_argument(
        "--micro-batch",
        action="append",
        default=[],
        metavar="STAGE=N",
        type=stage_micro_batch,
        help="use only rows of this micro-batch for this stage (repeat per stage)",
    )
    args = parser.parse_args(argv)
    rates = measured_rates(args.results, args.setup, args.gpu, dict(args.micro_batch))
    if not rates:
        sizes = f" and micro-batches {', '.join(f'{k}={n}' for k, n in args.micro_batch)}" if args.micro_batch else ""
        parser.error(f"no row with setup {args.setup!r}{sizes} in {', '.join(args.results)}")
    plan = project(rates, args.gpus, args.price)
    print(markdown(plan, args.gpus, args.price, args.setup))
    return plan


if __name__ == "__main__":
    main()
