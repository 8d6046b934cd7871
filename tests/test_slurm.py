"""SLURM end to end on a throw-away two-node loopback cluster (tests/slurm_cluster.py).

Every job goes the user's way: ``launch/submit.py`` -> ``sbatch launch/slurm/stage.sbatch`` -> ``srun``
-> ``launch/stage.py``, one CPU process (gloo) per node, expert-parallel size 2 across the two nodes.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_workers import free_port
from slurm_cluster import SlurmCluster, Unavailable, ensure_runnable

ROOT = Path(__file__).resolve().parents[1]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def warm_deepspeed_op() -> None:
    """Build DeepSpeed's CPU communication op once, in one process, before ranks race for its lock."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    code = "import deepspeed; deepspeed.init_distributed(dist_backend='gloo')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_runnable()
    except Unavailable as err:
        print(f"\nSKIPPING SLURM tests: this machine cannot run slurmd: {err}", file=sys.stderr)
        pytest.skip(f"this machine cannot run slurmd: {err}")
    warm_deepspeed_op()
    slurm = SlurmCluster()
    try:
        yield slurm.start()
    finally:
        slurm.stop()


def submit(cluster, out, *configs, extra=()) -> list[str]:
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py")]
    for config in configs:
        cmd += ["--config", str(ROOT / "configs" / "tiny" / config)]
    cmd += ["--ds", str(ROOT / "ds_configs" / "zero3.json"), "--nodes", "2", "--gpus-per-node", "1"]
    cmd += ["--ep", "2", "--ep-across-nodes", "--cpu", "--out", str(out), *extra]
    run = cluster.run(cmd, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return re.findall(r"submitted job (\d+)", run.stdout)


def log_of(run_dir: Path, job: str) -> str:
    # Two ranks write one file through srun, which may split a progress bar's multi-byte character.
    return (run_dir / f"slurm-{job}.out").read_text(errors="replace")


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage_runs_on_two_nodes_with_ranks_agreeing_and_checkpoints(cluster, tmp_path):
    (job,) = submit(cluster, tmp_path, "smoke.yaml")
    info = cluster.wait_for(job, FINISHED, 180)
    run_dir = tmp_path / "tiny-smoke"
    log = log_of(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]

    (ranks_line,) = [line for line in log.splitlines() if line.startswith('{"ranks"')]
    ranks = json.loads(ranks_line)["ranks"]
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert {r["node"] for r in ranks} == {"n1", "n2"}  # one process per node, started by srun
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks} == {("n1", ranks[0]["MASTER_PORT"])}
    assert steps_in(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000004"
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_usr1_checkpoints_requeues_and_resumes_without_repeating_steps(cluster, tmp_path):
    steps = 12
    (job,) = submit(cluster, tmp_path, "smoke.yaml", extra=["--set", f"stage.steps={steps}",
                                                             "--set", "stage.checkpoint_every=1000"])  # fmt: skip
    run_dir = tmp_path / "tiny-smoke"
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and len(steps_in(run_dir)) >= 2):
        assert time.time() < deadline and cluster.job(job).get("JobState") in {"PENDING", "RUNNING"}, cluster.job(job)
        time.sleep(0.2)
    # What SLURM does ahead of the time limit (--signal=USR1@N): USR1 to the job step's tasks only.
    assert cluster.run(["scancel", "--signal=USR1", job]).returncode == 0

    info = cluster.wait_for(job, FINISHED, 240)
    log = log_of(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    stopped = int(re.search(r"stop signal: checkpoint at step (\d+) written", log).group(1))
    assert 2 <= stopped < steps
    assert f"checkpoints/step_{stopped:07d} at step {stopped}" in log  # the requeued run resumed from it
    assert f"steps {stopped}->{steps}" in log
    assert "restart 0" in log and "restart 1" in log  # one log, appended to by the requeued run
    assert steps_in(run_dir) == list(range(1, steps + 1))  # no step lost or done twice
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:07d}"


def test_chained_stage_starts_after_the_previous_succeeds_from_its_weights(cluster, tmp_path):
    extra = ["--set", "stage.steps=2", "--set", "stage.data=synthetic", "--set", "stage.micro_batch=2"]
    extra += ["--set", "stage.global_batch=4", "--set", "stage.sample_every=0", "--set", "stage.log_every=1"]
    first, second = submit(cluster, tmp_path, "stage1.yaml", "stage2.yaml", extra=extra)
    waiting = cluster.job(second)
    assert waiting["JobState"] == "PENDING" and waiting["Reason"] == "Dependency", waiting
    assert waiting["Dependency"].startswith(f"afterok:{first}")

    one = cluster.wait_for(first, FINISHED, 180)
    two = cluster.wait_for(second, FINISHED, 180)
    log = log_of(tmp_path / "tiny-stage2", second)
    assert one["JobState"] == "COMPLETED" and two["JobState"] == "COMPLETED", log[-3000:]
    assert two["StartTime"] >= one["EndTime"]
    assert f"initialised from {tmp_path / 'tiny-stage1' / 'final'}" in log
    assert steps_in(tmp_path / "tiny-stage2") == [1, 2]

    # A chain whose first stage does not succeed never runs the second.
    first, second = submit(cluster, tmp_path / "failed", "stage1.yaml", "stage2.yaml", extra=extra)
    assert cluster.run(["scancel", first]).returncode == 0
    info = cluster.wait_for(second, FINISHED, 60)
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
    assert not (tmp_path / "failed" / "tiny-stage2" / f"slurm-{second}.out").exists()
