"""launch/submit.py: checks on the submit host, and the sbatch lines of a stage and a chain (fake sbatch)."""

import importlib.util
import os
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
TOY = ["--set", "stage.data=synthetic", "--set", "stage.micro_batch=2"]  # the tiny chain on a toy batch


@pytest.fixture
def submit(tmp_path, monkeypatch):
    """``submit.main`` with a fake ``sbatch`` first on PATH that records its arguments."""
    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nwc -l < {calls}\n')  # job ids 1, 2, ...
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(*args, configs=("smoke.yaml",), nodes=2, gpus=2):
        argv = [a for c in configs for a in ("--config", str(TINY / c))]
        argv += ["--ds", str(ROOT / "ds_configs" / "zero3.json"), "--nodes", str(nodes), "--gpus-per-node", str(gpus)]
        code = module.main([*argv, "--out", str(tmp_path / "runs"), *args])
        return code, [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return run


def test_one_stage_is_one_job_with_a_process_per_gpu(submit, tmp_path, capsys):
    code, calls = submit("--set", "stage.global_batch=8")
    assert code == 0 and len(calls) == 1
    (call,) = calls
    assert {"--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2"} <= set(call)
    assert f"--output={tmp_path}/runs/tiny-smoke/slurm-%j.out" in call
    script = call.index(str(ROOT / "launch" / "slurm" / "stage.sbatch"))
    assert call[script + 1 :][:6] == ["--config", str(TINY / "smoke.yaml"), "--ds", str(ROOT / "ds_configs/zero3.json"),
                                      "--out", str(tmp_path / "runs" / "tiny-smoke")]  # fmt: skip
    assert "submitted job 1" in capsys.readouterr().out


def test_chain_depends_afterok_and_starts_each_stage_from_the_previous_export(submit, tmp_path):
    stages = [f"stage{k}.yaml" for k in (1, 2, 3, 4)]
    synthetic = ("--set", "stage.data=synthetic", "--set", "stage.micro_batch=2")
    code, calls = submit("--set", "stage.global_batch=8", *synthetic, configs=stages)
    assert code == 0 and len(calls) == 4
    assert not any(a.startswith("--dependency") for a in calls[0])
    for k in (2, 3, 4):
        assert f"--dependency=afterok:{k - 1}" in calls[k - 1]
        assert f"stage.init_from={tmp_path}/runs/tiny-stage{k - 1}/final" in calls[k - 1]


@pytest.mark.parametrize(
    "args, configs, gpus, message",
    [
        (["--ep", "3"], ["smoke.yaml"], 2, "expert-parallel size 3 does not divide the 4 experts"),
        (["--ep", "4"], ["smoke.yaml"], 1, "expert-parallel size 4 does not divide the world size 2"),
        (["--ep", "4", "--set", "stage.global_batch=8"], ["smoke.yaml"], 2, "would span two nodes"),
        (["--set", "stage.data=/no/such/shards"], ["smoke.yaml"], 2, "stage.data: /no/such/shards does not exist"),
        (["--set", "stage.data=''"], ["smoke.yaml"], 2, "stage.data: no data source given"),
        (["--from-stage", "2", *TOY], ["stage1.yaml", "stage2.yaml"], 2, "tiny-stage1/final: missing model."),
        (["--init-from", "/no/export", *TOY], ["stage2.yaml"], 2, "stage.init_from: /no/export: missing model."),
        ([], ["smoke.yaml", "smoke.yaml"], 2, "each stage needs its own stage.name"),
    ],
)
def test_refused_before_anything_is_submitted(submit, capsys, args, configs, gpus, message):
    code, calls = submit("--set", "stage.global_batch=8" if gpus == 2 else "stage.global_batch=4", *args,
                         configs=configs, gpus=gpus)  # fmt: skip
    assert code == 2 and calls == []
    assert message in capsys.readouterr().err


def test_expert_parallel_groups_may_cross_nodes_when_asked(submit):
    code, calls = submit("--ep", "4", "--ep-across-nodes", "--set", "stage.global_batch=8")
    assert code == 0 and len(calls) == 1 and "4" == calls[0][calls[0].index("--ep") + 1]
