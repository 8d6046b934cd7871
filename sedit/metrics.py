"""What a training stage logs, and where: MoE routing statistics, rank-averaged scalars, memory, and
one ``MetricsLog`` that writes ``metrics.jsonl``, the console and Weights & Biases.

Per logged step the trainer does:

    ... forward / backward / step ...      # each MoE layer keeps the routing of its latest forward
    values = reduce_mean({"loss": loss, **moe_statistics(model)})   # collective, one host sync
    log.log(step, {**values, "lr": lr, **memory_stats(device)})

so the statistics are those of the step's last micro-batch. ``forget_routing(model)`` drops the kept
routing. Every key is described in docs/training.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from sedit.config import Config, to_dict
from sedit.files import atomic_write_text
from sedit.moe.layer import ExpertChoiceMoE
from sedit.moe.routing import expert_load, routing_stats

GIB = 2**30

# ----------------------------------------------------------------------------------------------
# MoE routing statistics
# ----------------------------------------------------------------------------------------------


def _moe_classes() -> tuple[type, ...]:
    """The MoE layer classes. The expert-parallel layer's module imports DeepSpeed, so it is only
    looked up when already imported: a model cannot hold such a layer before that import."""
    expert_parallel = sys.modules.get("sedit.moe.expert_parallel")
    if expert_parallel is None:
        return (ExpertChoiceMoE,)
    return (ExpertChoiceMoE, expert_parallel.ExpertChoiceEPLayer)


def _short_name(qualified: str, order: int) -> str:
    """'net.blocks.3.ffn' -> 'block03', 'mixer.1.ffn' -> 'mixer01'; 'layer<order>' if no list index."""
    found = re.findall(r"([A-Za-z_]+)\.(\d+)\.", qualified + ".")
    if not found:
        return f"layer{order:02d}"
    container, index = found[-1]
    return f"{container.removesuffix('s')}{int(index):02d}"


def moe_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every MoE layer of a (possibly wrapped) model in module order, named by its block."""
    classes = _moe_classes()
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, classes)]
    return [(_short_name(name, i), m) for i, (name, m) in enumerate(layers)]


def forget_routing(module: nn.Module) -> None:
    """Drop the routing every MoE layer kept of its latest forward (until its next forward)."""
    for _, layer in moe_layers(module):
        layer.last_routing = None


def moe_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """Routing statistics of each MoE layer's last forward, as 0-d tensors (no host sync).

    Keys ``moe/<block>/<stat>`` for every statistic of ``sedit.moe.routing.routing_stats``, plus
    ``moe/router_entropy`` and ``moe/dropped_fraction`` averaged over layers. Layers that kept no
    routing (no forward since ``forget_routing``) are left out. Under expert parallelism every rank routes its
    own images, so these are this rank's numbers: average them with ``reduce_mean``.
    """
    out: dict[str, torch.Tensor] = {}
    entropy, dropped = [], []
    for name, layer in moe_layers(module):
        if layer.last_routing is None:
            continue
        stats = routing_stats(layer.last_routing)
        out.update({f"moe/{name}/{key}": value for key, value in stats.items()})
        entropy.append(stats["router_entropy"])
        dropped.append(stats["dropped_fraction"])
    if entropy:
        out["moe/router_entropy"] = torch.stack(entropy).mean()
        out["moe/dropped_fraction"] = torch.stack(dropped).mean()
    return out


def moe_expert_load(module: nn.Module) -> dict[str, torch.Tensor]:
    """Per-expert vectors (E,) of each MoE layer's last forward: ``moe/<block>/tokens`` and
    ``moe/<block>/importance`` (see ``sedit.moe.routing.expert_load``), for detailed dumps."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in moe_layers(module):
        if layer.last_routing is not None:
            out.update({f"moe/{name}/{key}": value for key, value in expert_load(layer.last_routing).items()})
    return out


# ----------------------------------------------------------------------------------------------
# Scalars across ranks, memory
# ----------------------------------------------------------------------------------------------


def _as_scalar(name: str, value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64, device=device).detach()
    if value.numel() != 1:
        raise ValueError(f"reduce_mean: {name!r} has shape {tuple(value.shape)}, expected a scalar")
    return value.reshape(())


def reduce_mean(values: dict[str, torch.Tensor | float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Mean of every value over the ranks of ``group`` (all of them by default), as Python floats.

    Collective when torch.distributed is initialised: every rank calls it with the same keys in the
    same order. One all-reduce of all values stacked (float64, so a Python float comes back as it
    went in), and one host sync (``tolist``).
    """
    if not values:
        return {}
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([_as_scalar(name, v, device) for name, v in values.items()])  # (K,)
    if dist.is_available() and dist.is_initialized():
        # NCCL reduces CUDA tensors only; gloo is given CPU tensors.
        nccl = dist.get_backend(group) == "nccl"
        stacked = stacked.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        dist.all_reduce(stacked, group=group)
        stacked /= dist.get_world_size(group)
    return dict(zip(values, stacked.tolist(), strict=True))


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory of this process in GiB. CUDA: allocated now, peak allocated since the previous call
    (the peak is reset here), reserved by the caching allocator. CPU: peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        stats = {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "mem/peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "mem/reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem/rss_peak_gib": peak / (GIB if sys.platform == "darwin" else 2**20)}


# ----------------------------------------------------------------------------------------------
# The log: metrics.jsonl, console, wandb
# ----------------------------------------------------------------------------------------------


def trim_records(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step``: later ones came from steps lost since the
    checkpoint and will be logged again. A torn last line (a killed writer) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _console_line(step: int, values: dict[str, Any]) -> str:
    """Compact one-line JSON of a record for the console; per-layer MoE keys stay in the files."""
    shown = {"step": step}
    for key, value in values.items():
        if key.count("/") >= 2 and key.startswith("moe/"):
            continue
        shown[key] = float(f"{value:.4g}") if isinstance(value, float) else value
    return json.dumps(shown, separators=(",", ":"))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class MetricsLog:
    """Training records of one stage, written by the main rank (on other ranks every call is a no-op).

    - ``run_dir/metrics.jsonl``: one JSON object per ``log`` call, ``step`` first. Records of steps
      after ``start_step`` are removed on opening, so a resumed run holds each step once.
    - console: a progress bar on stderr, and each record as one line of JSON on stdout.
    - Weights & Biases: mode ``cfg.stage.wandb`` ('offline': files under ``run_dir/wandb``,
      'online', 'disabled'); the WANDB_MODE environment variable, if set, wins. The run id is kept in
      ``run_dir/wandb_id.txt`` so a resumed stage continues the same wandb run. If wandb cannot
      start, a warning is printed and training goes on with the file and the console.
    """

    def __init__(
        self, run_dir: str | Path, cfg: Config, start_step: int = 0, total_steps: int | None = None, main: bool = True
    ):
        self.main = main
        self.file = None
        self.bar = None
        self.wandb_run = None
        if not main:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        trim_records(path, start_step)
        self.file = open(path, "a")
        # Not a terminal (a SLURM log): redraw the bar rarely, every redraw is written out.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps if total_steps is not None else cfg.stage.steps,
            initial=start_step,
            desc=cfg.stage.name,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0 if interactive else 60.0,
        )
        self.wandb_run = self._start_wandb(cfg)

    def _start_wandb(self, cfg: Config):
        mode = os.environ.get("WANDB_MODE") or cfg.stage.wandb
        if mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        try:
            import wandb

            run = wandb.init(
                project=cfg.stage.wandb_project,
                name=cfg.stage.name,
                dir=self.run_dir,
                config=to_dict(cfg),
                id=run_id,
                resume="allow",
                mode=mode,
                settings=wandb.Settings(console="off"),  # the console stays in the job's own log
            )
            # x-axis: our step. A resumed run logs the steps redone since the checkpoint again;
            # with wandb's own step those records would be refused as going backwards.
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
        except Exception as err:  # logging must never stop a training run
            tqdm.write(f"warning: wandb ({mode}) did not start, logging to metrics.jsonl only: {err}", file=sys.stderr)
            return None
        atomic_write_text(id_file, run.id + "\n")
        return run

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: appended to metrics.jsonl, printed, sent to wandb."""
        if not self.main:
            return
        values = {key: _plain(value) for key, value in values.items()}
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        tqdm.write(_console_line(step, values), file=sys.stdout)
        sys.stdout.flush()  # a SLURM log is a file: show the record now, not when the buffer fills
        postfix = {key: f"{values[key]:.4g}" for key in ("loss", "images_per_s") if key in values}
        self.bar.set_postfix(postfix, refresh=False)
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **values})

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar on by ``steps`` optimizer steps."""
        if self.bar is not None:
            self.bar.update(steps)

    def close(self, exit_code: int = 0) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
