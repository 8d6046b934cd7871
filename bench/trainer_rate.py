"""A trainer run's throughput as one bench/train_step.py-style JSON line, for bench/cost_projection.py.

    python3 bench/trainer_rate.py RUN/metrics.jsonl --stage 1 --world-size 4 --gpu "NVIDIA H200" \\
        --setup "trainer, flat engine, CUDA graphs" >> rates.jsonl

The trainer logs ``images_per_s`` (all GPUs together) for every ``stage.log_every`` steps. The first
logged interval holds the compile and the first steps, so it is left out; the rate is the median of the
others, and the per-GPU rate divides it by the world size:

    r = median(images_per_s over intervals 2..n) / W

Intervals after a checkpoint or a sample grid restart their clock (sedit/train.py), so those pauses are
not in r: the checkpoint's own time is reported beside it, not folded in.
The micro-batch, resolution and mask ratio come from the run's resolved ``config.yaml`` (``--config``;
bench/xl_trainer.sh passes it), which also gives the global batch and the accumulation; without it,
from the recipe's ``configs/<preset>/stage<K>.yaml``, and the batch is left out (the run may have
overridden it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cost_projection import json_lines  # noqa: E402

from sedit.config import load_config  # noqa: E402


def interval_rates(path: Path) -> list[float]:
    """``images_per_s`` of every logged interval, in step order; a broken line is named."""
    return [float(record["images_per_s"]) for record in json_lines(path) if "images_per_s" in record]


def trainer_row(
    path: Path, stage: int, world_size: int, gpu: str, setup: str, preset: str = "xl", config: Path | None = None
) -> dict:
    """The JSON line for this run: the per-GPU rate r and what it was measured on."""
    rates = interval_rates(path)
    if len(rates) < 2:
        needed = "at least 2 are needed (the first holds the compile)"
        raise ValueError(f"{path}: {len(rates)} logged interval(s); {needed}")
    steady = rates[1:]
    run = load_config(config or ROOT / "configs" / preset / f"stage{stage}.yaml").stage
    total = statistics.median(steady)
    row = {
        "preset": preset.upper(),
        "stage": stage,
        "resolution": run.resolution,
        "mask_ratio": run.mask_ratio,
        "micro_batch": run.micro_batch,
    }
    if config is not None:
        row |= {"global_batch": run.global_batch, "accumulation": run.accumulation(world_size)}
    return row | {
        "world_size": world_size,
        "setup": setup,
        "images_per_s_total": total,
        "images_per_s_per_gpu": total / world_size,
        "intervals": len(steady),
        "interval_min": min(steady),
        "interval_max": max(steady),
        "gpu": gpu,
        "source_metrics": path.name,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3, 4))
    parser.add_argument("--world-size", type=int, required=True, help="GPUs the run trained on")
    parser.add_argument("--gpu", required=True, help="the GPU's name, as nvidia-smi gives it")
    parser.add_argument("--setup", required=True, help="what ran, e.g. 'trainer, flat engine, CUDA graphs'")
    parser.add_argument("--config", type=Path, default=None, help="the run's resolved config.yaml")
    parser.add_argument("--preset", default="xl", help="configs/<preset>/ holds the recipe's stage configs")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be at least 1")
    try:
        row = trainer_row(args.metrics, args.stage, args.world_size, args.gpu, args.setup, args.preset, args.config)
    except (OSError, ValueError) as err:
        parser.exit(2, f"trainer_rate: {err}\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
