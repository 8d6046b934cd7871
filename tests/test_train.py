"""The stage trainer on prepared data: exact resume after a kill, corrupt-checkpoint fallback, NaN stop."""

import os
import re
import signal
import subprocess
import time

import pytest
import torch
from train_helpers import curve, one_process_env, records, run_stage, stage_command

from sedit.checkpoint import export_consolidated, load_consolidated
from sedit.config import ConfigError, build_config, load_config
from sedit.preemption import REQUEUE_EXIT
from sedit.stage_data import check_prepared
from sedit.train import DIVERGED_EXIT, check_init_from

STEPS = 24


@pytest.fixture(scope="module")
def settings(builtin_small):
    """A short stage at constant lr (so a longer rerun repeats the same steps exactly)."""
    return {
        "data": builtin_small,
        "steps": STEPS,
        "micro_batch": 8,
        "global_batch": 8,
        "lr": 2e-3,
        "lr_final": 2e-3,
        "warmup_steps": 0,
        "log_every": 1,
        "checkpoint_every": 4,
        "sample_every": 0,
        "num_workers": 1,
        "shuffle_buffer": 16,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, settings):
    out = tmp_path_factory.mktemp("uninterrupted")
    run = run_stage(out, settings)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_a_stage_logs_checkpoints_and_exports(uninterrupted):
    logged = records(uninterrupted)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in logged]
    assert sum(losses[-8:]) < sum(losses[:8])  # single-batch losses are noisy; their means fall
    last = logged[-1]
    for key in ("lr", "grad_norm", "images_per_s", "moe/router_entropy", "moe/dropped_fraction", "mem/rss_peak_gib"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert 0 < last["moe/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert last["data/failed_shards"] == 0 and last["data/missing_samples"] == 0
    kept = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000020", "step_0000024"]  # keep_checkpoints: 2
    assert (uninterrupted / "checkpoints" / "latest").read_text() == "step_0000024"
    net, cfg = load_consolidated(uninterrupted / "final")
    again, _ = load_consolidated(uninterrupted / "checkpoints" / "step_0000024" / "export")
    for (name, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # no EMA: the final export is the last checkpoint's raw weights


def test_killed_run_resumes_with_the_same_loss_curve(tmp_path, settings, uninterrupted):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        stage_command(run_dir, settings), env=one_process_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: loader workers die too
    proc.wait()
    assert latest.is_file() and not (run_dir / "final").exists(), "the run should die between checkpoints"
    killed_at = int(latest.read_text().split("_")[1])

    resumed = run_stage(run_dir, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout
    assert curve(run_dir) == curve(uninterrupted)  # bit-exact: same batches, noise, masks, optimizer state


def test_sigterm_to_the_process_group_stops_at_a_checkpoint_and_resumes(tmp_path, settings, uninterrupted):
    """What `timeout` and schedulers do: SIGTERM to every process of the group, loader workers too. The
    workers ignore it; the trainer finishes its step, checkpoints and exits with REQUEUE_EXIT."""
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        stage_command(run_dir, settings), env=one_process_env(), start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == REQUEUE_EXIT, stderr[-3000:]
    stopped_at = int(re.search(r"stop signal: checkpoint at step (\d+) written", stdout).group(1))
    assert stopped_at < STEPS and (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:07d}"

    resumed = run_stage(run_dir, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curve(run_dir) == curve(uninterrupted)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, settings, uninterrupted):
    import shutil

    run_dir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "checkpoints" / "step_0000024"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a disk that filled up mid-write

    longer = run_stage(run_dir, {**settings, "steps": STEPS + 4})
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "step_0000024 is not intact" in longer.stdout and "truncated" in longer.stdout
    assert "at step 20" in longer.stdout
    redone = [c for c in curve(run_dir) if 20 < c[0] <= STEPS]
    assert redone == [c for c in curve(uninterrupted) if c[0] > 20]  # steps 21-24 again, identically
    assert [c[0] for c in curve(run_dir)] == list(range(1, STEPS + 5))


@pytest.mark.parametrize("ds", ["cpu.json", "flat_dp.json"])  # the flat engine also checks its gradient norm
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, settings, ds):
    run = run_stage(tmp_path, {**settings, "steps": 12, "lr": 1e30, "lr_final": 1e30, "checkpoint_every": 1}, ds=ds)
    assert run.returncode == DIVERGED_EXIT, run.stderr[-3000:]
    assert re.search(r"(loss|grad_norm) is (nan|inf)", run.stderr), run.stderr[-3000:]
    last_good = (tmp_path / "checkpoints" / "latest").read_text()
    diverged_at = int(last_good.split("_")[1]) + 1
    assert re.search(rf"step {diverged_at}: (loss|grad_norm) is", run.stderr)
    assert f"Last good checkpoint: {tmp_path}" in run.stderr
    assert not (tmp_path / "checkpoints" / f"step_{diverged_at:07d}").exists()
    assert not (tmp_path / "final").exists()
    assert all(r["loss"] == r["loss"] for r in records(tmp_path))  # nothing non-finite was logged


def test_data_that_does_not_fit_the_model_is_refused_naming_both(builtin_small):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml"
    cfg = load_config(config, {"stage": {"data": str(builtin_small)}})
    assert check_prepared(cfg)["samples"] == 48
    short = load_config(config, {"stage": {"data": str(builtin_small)}, "model": {"caption_len": 8}})
    with pytest.raises(ConfigError, match=r"text tokens are \(77, 32\).*model.caption_len 8"):
        check_prepared(short)
    with pytest.raises(ConfigError, match="no latents at stage.resolution 128"):
        check_prepared(load_config(config, {"stage": {"data": str(builtin_small), "resolution": 128}}))


def test_a_256_stage_export_starts_the_512_stage(tmp_path):
    """Position embeddings are recomputed for the larger grid: no missing keys, a sensible first output."""
    low = build_config({"preset": "tiny", "stage": {"resolution": 32, "latent_downsample": 4}})
    torch.manual_seed(0)
    from helpers import perturb_zero_init
    from sedit.model import build_model

    net = build_model(low.model)
    perturb_zero_init(net, seed=0)
    export_consolidated(net, low, tmp_path / "final")
    high = build_config(
        {"preset": "tiny", "stage": {"resolution": 64, "latent_downsample": 4, "init_from": str(tmp_path / "final")}}
    )
    check_init_from(high, "stage3.yaml")
    loaded, _ = load_consolidated(tmp_path / "final")  # strict: raises on missing or unexpected keys
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)  # 64px / 4 = 16x16 latents: 64 tokens instead of 16
    captions = torch.randn(4, high.model.caption_len, high.model.caption_dim, generator=g)
    with torch.no_grad():
        out = loaded(x, torch.full((4,), 0.5), captions)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.std() > 1e-3 and (out[0] - out[1]).abs().mean() > 1e-4  # not constant, depends on the input
    assert loaded.pos_embed.shape[0] == 64  # the 8x8 token grid, recomputed


def test_a_compiled_stage_follows_the_eager_loss_curve(tmp_path, settings, uninterrupted):
    """stage.compile: the same steps as the eager run (same data, seeds, lr) to compiler precision."""
    steps = 4
    run = run_stage(tmp_path, {**settings, "steps": steps, "checkpoint_every": 100, "compile": True}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch.compile: True" in run.stdout
    compiled, eager = curve(tmp_path), curve(uninterrupted)[:steps]
    assert [c[0] for c in compiled] == [e[0] for e in eager] == list(range(1, steps + 1))
    for (step, loss, norm), (_, eager_loss, eager_norm) in zip(compiled, eager, strict=True):
        assert loss == pytest.approx(eager_loss, rel=1e-3), step
        assert norm == pytest.approx(eager_norm, rel=1e-2), step


def test_the_flat_engine_trains_and_samples_grids_on_prepared_data(tmp_path, settings):
    """ds_configs/flat_dp.json as shipped (bf16 autocast over fp32 weights), with sample grids drawn
    outside the engine under the same autocast."""
    short = {**settings, "steps": 4, "sample_every": 2, "sample_count": 2, "checkpoint_every": 100}
    run = run_stage(tmp_path, short, ds="flat_dp.json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [c[0] for c in curve(tmp_path)] == [1, 2, 3, 4]
    assert all(0 < loss < 3 and norm > 0 for _, loss, norm in curve(tmp_path))
    grids = sorted(p.name for p in (tmp_path / "samples").glob("step_*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
