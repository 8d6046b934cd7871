"""The pipeline's closing report: per stage its loss, time and throughput, and a grid from its final weights.

``OUT/report.md`` and ``OUT/report.json``; the loss curves of all stages in ``OUT/report/losses.png``;
grids in ``OUT/report/<stage>.png`` are sampled with ``sedit.generate`` from each stage's ``final/``
export (EMA weights where the stage kept them) for the prompts of that stage's training-time grids,
noise seeds 0..n-1, so stages compare image for image.
"""

from __future__ import annotations

import json
from pathlib import Path

from sedit.config import Config
from sedit.files import atomic_write_text


def read_records(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def stage_numbers(cfg: Config, stage_dir: Path, records: list[dict]) -> dict:
    """Loss at the first and last logged steps (and the mean of the last five logs), time, images/s,
    from the stage's metrics records and summary."""
    records = [r for r in records if "loss" in r]
    summary = json.loads((stage_dir / "summary.json").read_text()) if (stage_dir / "summary.json").is_file() else {}
    tail = [r["loss"] for r in records[-5:]]
    return {
        "stage": cfg.stage.name,
        "resolution": cfg.stage.resolution,
        "mask_ratio": cfg.stage.mask_ratio,
        "steps": summary.get("steps", records[-1]["step"] if records else 0),
        "loss_first": records[0]["loss"] if records else None,
        "loss_last": records[-1]["loss"] if records else None,
        "loss_last5_mean": sum(tail) / len(tail) if tail else None,
        "seconds": summary.get("seconds"),
        "images_per_s": summary.get("images_per_s"),
        "final_weights": summary.get("final_weights"),
    }


def final_grid(stage_dir: Path, out_png: Path, prompts: int) -> Path | None:
    """Sample the stage's final export for its grid prompts (None when the stage had no prompts)."""
    from sedit.generate import main as generate

    listed = stage_dir / "samples" / "prompts.json"
    if not listed.is_file():
        return None
    texts = json.loads(listed.read_text())[:prompts]
    prompt_file = out_png.with_suffix(".prompts.txt")
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prompt_file, "".join(t.replace("\n", " ") + "\n" for t in texts))
    generate(["--ckpt", str(stage_dir / "final"), "--prompts-file", str(prompt_file), "--out", str(out_png)])
    return out_png


def plot_losses(out_png: Path, stages: list[tuple[str, list[dict]]]) -> Path | None:
    """Training loss against the pipeline's cumulative step, one colour per stage (None without records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(records for _, records in stages):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for name, records in stages:
        logged = [r for r in records if "loss" in r]
        if logged:
            ax.plot([offset + r["step"] for r in logged], [r["loss"] for r in logged], label=name, linewidth=1)
            offset += logged[-1]["step"]
    ax.set_xlabel("optimizer step (stages in order)")
    ax.set_ylabel("EDM loss (logged steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_report(out: Path, stages: list[tuple[Config, Path]]) -> Path:
    rows, lines, curves = [], [], []
    for cfg, stage_dir in stages:
        records = read_records(stage_dir)
        curves.append((cfg.stage.name, records))
        numbers = stage_numbers(cfg, stage_dir, records)
        grid = final_grid(stage_dir, out / "report" / f"{cfg.stage.name}.png", cfg.stage.sample_count)
        numbers["grid"] = str(grid.relative_to(out)) if grid else None
        rows.append(numbers)
    lines += [
        "# Pipeline report",
        "",
        "| stage | res | mask | steps | loss (first log) | loss (last log) | mean of last 5 logs | time (s) "
        "| images/s | weights |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['resolution']} | {r['mask_ratio']} | {r['steps']} | {fmt(r['loss_first'])} | "
            f"{fmt(r['loss_last'])} | {fmt(r['loss_last5_mean'])} | {fmt(r['seconds'], 4)} | "
            f"{fmt(r['images_per_s'], 4)} | {r['final_weights'] or '-'} |"
        )
    curve = plot_losses(out / "report" / "losses.png", curves)
    if curve:
        lines += ["", f"![training loss per stage]({curve.relative_to(out)})"]
    lines += ["", "Each grid: the stage's final weights, the prompts of its training-time grids, seeds 0..n-1.", ""]
    for r in rows:
        if r["grid"]:
            lines += [f"## {r['stage']}", "", f"![{r['stage']}]({r['grid']})", ""]
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
