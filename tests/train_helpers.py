"""Running ``launch/stage.py`` and ``launch/pipeline.py`` as users do, in one CPU process each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_env(**extra: str) -> dict[str, str]:
    """What a launcher would set for a single process, on the CPU, with wandb off unless asked."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("WANDB_MODE", "disabled")
    env.update(extra)
    return env


def stage_command(out: Path, settings: dict, config: str = "configs/tiny/stage1.yaml", ds: str = "cpu.json") -> list:
    cmd = [sys.executable, str(ROOT / "launch" / "stage.py"), "--config", str(ROOT / config)]
    cmd += ["--ds", str(ROOT / "ds_configs" / ds), "--ep", "1", "--out", str(out)]
    return cmd + [f"--set=stage.{k}={v}" for k, v in settings.items()]


def run_stage(out: Path, settings: dict, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_command(out, settings, **kwargs), capture_output=True, text=True, env=one_process_env(), timeout=timeout
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple]:
    """(step, loss, grad norm) of every logged step, exactly as logged."""
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in records(run_dir)]
