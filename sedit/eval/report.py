"""Collect the metrics of several generate folders into one JSON report and a plot.

    python -m sedit.eval.report runs/eval/g* --out runs/eval/report

Each folder contributes its generation settings (manifest.json) and whatever of fid.json and
clip_score.json exists. ``report.json`` lists one row per folder, sorted by guidance scale; with two
or more guidance scales, ``report.png`` plots FID and CLIP score against the guidance scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sedit.eval.files import write_json
from sedit.eval.generate import read_manifest


def collect(folders: list[str | Path]) -> list[dict]:
    rows = []
    for folder in map(Path, folders):
        settings = read_manifest(folder)["settings"]
        row = {"folder": str(folder), "settings": settings, "metrics": {}, "evaluation": {}}
        for name in ("fid", "clip_score"):
            path = folder / f"{name}.json"
            if path.is_file():
                data = json.loads(path.read_text())
                row["metrics"].update(data["metrics"])
                row["evaluation"][name] = {k: v for k, v in data.items() if k not in ("metrics", "generation")}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["settings"]["guidance_scale"], r["settings"]["steps"], r["folder"]))


def plot(rows: list[dict], path: Path) -> Path | None:
    """FID and CLIP score against guidance scale; None when fewer than two scales have a metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in (("fid", "FID"), ("clip_score", "CLIP score")) if _series(rows, k)[0]]
    scales = {r["settings"]["guidance_scale"] for r in rows}
    if len(scales) < 2 or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    s = rows[0]["settings"]
    fig.suptitle(f"{Path(s['checkpoint']).name}: {s['num']} captions, {s['steps']} Heun steps", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["settings"]["guidance_scale"], r["metrics"][key]) for r in rows if key in r["metrics"]]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sedit.eval.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folders", nargs="+", help="output folders of sedit.eval.generate (with fid.json / clip_score.json)")
    p.add_argument("--out", required=True, help="folder for report.json and report.png")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = collect(args.folders)
    figure = plot(rows, out / "report.png")
    write_json(out / "report.json", {"rows": rows, "plot": str(figure) if figure else None})
    for r in rows:
        print(
            f"guidance {r['settings']['guidance_scale']:g}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items())
        )


if __name__ == "__main__":
    main()
