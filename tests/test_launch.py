"""The user-facing launch path: ``deepspeed --num_gpus 2 launch/stage.py`` on CPU (gloo)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from dist_workers import free_port

from helpers import perturb_zero_init

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def launch(out, *extra, ds="zero3.json", procs=2):
    cmd = [
        DEEPSPEED, "--num_gpus", str(procs), "--master_port", str(free_port()), str(ROOT / "launch" / "stage.py"),
        "--config", str(ROOT / "configs" / "tiny" / "smoke.yaml"), "--ds", str(ROOT / "ds_configs" / ds),
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_deepspeed_launcher_trains_checkpoints_exports_and_resumes(tmp_path):
    run = launch(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000004"
    assert (tmp_path / "final" / "model.safetensors").is_file()

    again = launch(tmp_path, "--set", "stage.steps=6", ds="zero3.json")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # appended, no step repeated or lost


def refused(*extra, world="2"):
    cmd = [sys.executable, str(ROOT / "launch" / "stage.py"), "--config", str(ROOT / "configs/tiny/smoke.yaml"), *extra]
    env = {**os.environ, "WORLD_SIZE": world, "RANK": "0", "DS_ACCELERATOR": "cpu"}
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    return run, time.time() - start


def test_unsupported_layout_is_refused_before_any_work(tmp_path):
    run, seconds = refused("--ds", str(ROOT / "ds_configs/zero3.json"), "--ep", "3", "--out", str(tmp_path / "x"))
    assert run.returncode == 2
    assert "expert-parallel size 3 does not divide the 4 experts" in run.stderr
    assert not (tmp_path / "x").exists() and seconds < 60

    run, _ = refused("--ds", str(ROOT / "ds_configs/zero2_ep.json"), "--ep", "4", world="2")
    assert run.returncode == 2 and "does not divide the world size 2" in run.stderr

    run, _ = refused("--ds", str(ROOT / "ds_configs/zero3.json"), "--set", "stage.data=''", world="2")
    assert run.returncode == 2 and "stage.data: no data source" in run.stderr

    run, _ = refused("--ds", str(tmp_path / "missing.json"), world="2")
    assert run.returncode == 2 and "missing.json: DeepSpeed config not found" in run.stderr


def test_dry_run_prints_resolved_configs():
    run, _ = refused("--ds", str(ROOT / "ds_configs/zero2_ep.json"), "--dry-run", world="2")
    assert run.returncode == 0, run.stderr
    assert '"gradient_accumulation_steps": 1' in run.stdout and '"autoep_size": 2' in run.stdout
    assert "name: tiny-smoke" in run.stdout


def test_init_from_starts_the_stage_from_an_exported_model(tmp_path):
    from safetensors.torch import load_file

    from sedit.checkpoint import MODEL_FILE, export_consolidated
    from sedit.config import load_config
    from sedit.model import build_model

    cfg = load_config(ROOT / "configs" / "tiny" / "smoke.yaml")
    torch.manual_seed(123)  # weights unlike the stage's own seed-0 initialisation
    net = build_model(cfg.model)
    perturb_zero_init(net)
    export_consolidated(net, cfg, tmp_path / "previous")

    run = launch(tmp_path / "run", "--ep", "1", "--set", f"stage.init_from={tmp_path / 'previous'}",
                 "--set", "stage.steps=0", procs=1)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"initialised from {tmp_path / 'previous'}" in run.stdout
    start, end = load_file(tmp_path / "previous" / MODEL_FILE), load_file(tmp_path / "run" / "final" / MODEL_FILE)
    # bf16 training: DeepSpeed casts the module to bf16 and keeps fp32 master weights of those values
    assert start.keys() == end.keys() and all(torch.equal(start[k].bfloat16().float(), end[k]) for k in start)

    run, _ = refused("--ds", str(ROOT / "ds_configs/zero3.json"), "--set", f"stage.init_from={tmp_path}/none")
    assert run.returncode == 2 and "stage.init_from:" in run.stderr and "missing model.safetensors" in run.stderr
