"""bench/host_overhead.py: XL's parameter structure at tiny widths, timed plain and under DeepSpeed on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sedit.model import build_model
from sedit.presets import preset

ROOT = Path(__file__).resolve().parents[1]


def test_times_every_phase_of_xls_structure_plain_and_under_deepspeed():
    command = [
        sys.executable,
        "bench/host_overhead.py",
        "--ds",
        "ds_configs/zero1_ep.json",
        "--warmup",
        "0",
        "--steps",
        "2",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["setup"] for r in rows] == [
        "plain PyTorch, fused AdamW",
        "plain PyTorch, flat gradient buffer, fused AdamW",
        "deepspeed zero1_ep.json ep=1",
    ]
    with torch.device("meta"):
        xl_tensors = sum(1 for _ in build_model(preset("XL")).parameters())
    for r in rows:
        assert r["parameter_tensors"] == xl_tensors  # the structure of XL, one tensor for each of its tensors
    plain, flat, deepspeed = (f"{r['step'] - rows[0]['step']:+.1f}" for r in rows)
    assert f"| {plain} |" in run.stdout and plain == "+0.0"  # the table gives each set-up's difference to plain
    assert f"| {flat} |" in run.stdout and f"| {deepspeed} |" in run.stdout
