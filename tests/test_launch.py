"""The user-facing launch path: ``deepspeed --num_gpus 2 launch/stage.py`` on CPU (gloo)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_workers import free_port

from helpers import perturb_zero_init

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def launch(out, *extra, ds="zero3.json", procs=2, port=None):
    port = port or free_port()
    cmd = [
        DEEPSPEED, "--num_gpus", str(procs), "--master_port", str(port), str(ROOT / "launch" / "stage.py"),
        "--config", str(ROOT / "configs" / "tiny" / "smoke.yaml"), "--ds", str(ROOT / "ds_configs" / ds),
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def shared_memory_left(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of the run that used this master port (distributed.cpu_allreduce_buffer)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_deepspeed_launcher_trains_checkpoints_exports_and_resumes(tmp_path):
    port = free_port()
    run = launch(tmp_path, port=port)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert shared_memory_left(port) == []
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000004"
    assert (tmp_path / "final" / "model.safetensors").is_file()

    again = launch(tmp_path, "--set", "stage.steps=6", ds="zero3.json")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # appended, no step repeated or lost


def test_a_cpu_run_removes_the_shared_memory_deepspeed_leaves(tmp_path):
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "tests" / "shm_worker.py"),
           "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sum"] == [3.0] * 4  # 1 + 2: both ranks took part
        assert record["existed"], f"DeepSpeed made no {record['buffer']}: the name no longer matches shm.cpp's"
        assert not record["exists_after"]
    assert shared_memory_left(port) == []


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


@pytest.mark.parametrize("ds", ["zero3.json", "flat_dp.json"])  # the pipeline chains stages on either engine
def test_init_from_starts_the_stage_from_an_exported_model(tmp_path, ds):
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
                 "--set", "stage.steps=0", ds=ds, procs=1)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"initialised from {tmp_path / 'previous'}" in run.stdout
    start, end = load_file(tmp_path / "previous" / MODEL_FILE), load_file(tmp_path / "run" / "final" / MODEL_FILE)
    # DeepSpeed's bf16 casts the module to bf16 and keeps fp32 master weights of those values; the flat
    # engine keeps the fp32 weights themselves (bf16 only inside its autocast)
    as_trained = (lambda t: t.bfloat16().float()) if ds == "zero3.json" else (lambda t: t)
    assert start.keys() == end.keys() and all(torch.equal(as_trained(start[k]), end[k]) for k in start)

    run, _ = refused("--ds", str(ROOT / "ds_configs/zero3.json"), "--set", f"stage.init_from={tmp_path}/none")
    assert run.returncode == 2 and "stage.init_from:" in run.stderr and "missing model.safetensors" in run.stderr


def test_flat_engine_follows_deepspeed_resumes_exactly_and_exports(tmp_path):
    """ds_configs/flat_dp.json (plain data parallelism, sedit.flat_engine) under the deepspeed launcher,
    two processes, fp32: the loss curve, gradient norms and EMA export of DeepSpeed's fp32 ZeRO-2 engine
    (cpu.json) on the same data; a run stopped at step 4 and resumed repeats the uninterrupted one."""
    from sedit.checkpoint import load_consolidated

    flat = json.loads((ROOT / "ds_configs" / "flat_dp.json").read_text())
    assert flat["engine"] == "flat"
    flat_fp32 = tmp_path / "flat_fp32.json"
    flat_fp32.write_text(json.dumps({**flat, "bf16": {"enabled": False}}))  # compared with an fp32 DeepSpeed run
    # constant lr: a 4-step and a 6-step run take the same first steps; clipping acts at this clip;
    # 2 processes x micro-batch 2 x accumulation 2
    recipe = ["--set", "stage.lr_final=1e-3", "--set", "stage.ema_decay=0.9", "--set", "stage.grad_clip=0.05"]
    recipe += ["--set", "stage.global_batch=8"]

    def curve(run_dir):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]

    runs = {
        "flat": launch(tmp_path / "flat", *recipe, "--set", "stage.steps=6", ds=flat_fp32),
        "deepspeed": launch(tmp_path / "deepspeed", *recipe, "--set", "stage.steps=6", ds="cpu.json"),
        "stopped": launch(tmp_path / "resumed", *recipe, ds=flat_fp32),  # smoke.yaml: 4 steps
        "resumed": launch(tmp_path / "resumed", *recipe, "--set", "stage.steps=6", ds=flat_fp32),
        "shipped": launch(tmp_path / "bf16", "--set", "stage.steps=2", ds="flat_dp.json"),  # bf16 autocast
    }
    for name, run in runs.items():
        assert run.returncode == 0, name + run.stdout[-3000:] + run.stderr[-3000:]
    assert "accumulation 2" in runs["flat"].stdout and "at step 4" in runs["resumed"].stdout
    assert all(abs(loss - 1) < 0.5 for _, loss, _ in curve(tmp_path / "bf16"))
    assert curve(tmp_path / "resumed") == curve(tmp_path / "flat")  # bit-exact
    newest = tmp_path / "resumed" / "checkpoints" / "step_0000006"
    rank_states = [torch.load(newest / f"trainer_rank{r:05d}.pt", weights_only=True) for r in (0, 1)]
    assert "ema" in rank_states[0] and "ema" not in rank_states[1]  # the ranks' weights agree: rank 0 keeps the EMA
    resumed_ema, _ = load_consolidated(tmp_path / "resumed" / "final")  # the EMA came through the checkpoint
    uninterrupted_ema, _ = load_consolidated(tmp_path / "flat" / "final")
    for (name, a), (_, b) in zip(resumed_ema.state_dict().items(), uninterrupted_ema.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    steps = list(zip(curve(tmp_path / "flat"), curve(tmp_path / "deepspeed"), strict=True))
    assert [a[0] for a, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(a[2] > 0.05 for a, _ in steps), "clipping should act in every step"
    for (step, loss, norm), (_, ds_loss, ds_norm) in steps:
        assert abs(loss / ds_loss - 1) < 1e-4 and abs(norm / ds_norm - 1) < 1e-3, (step, loss, ds_loss, norm, ds_norm)

    ours, _ = load_consolidated(tmp_path / "flat" / "final")  # the EMA weights (stage.ema_decay > 0)
    theirs, _ = load_consolidated(tmp_path / "deepspeed" / "final")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)

    other = launch(tmp_path / "flat", *recipe, "--set", "stage.steps=8", ds="cpu.json")
    assert other.returncode != 0 and "engine flat -> deepspeed" in other.stdout + other.stderr
    # the refused run leaves the record of what the checkpoints hold (the pipeline resumes with it)
    assert json.loads((tmp_path / "flat" / "ds_config.json").read_text())["engine"] == "flat"
