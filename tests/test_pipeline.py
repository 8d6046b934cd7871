"""launch/pipeline.py: four tiny stages on the built-in data, each from the previous one's final weights."""

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from train_helpers import ROOT, one_process_env, records

from sedit.checkpoint import EMA_FILE, MODEL_FILE, load_consolidated

STAGES = ["tiny-stage1", "tiny-stage2", "tiny-stage3", "tiny-stage4"]


def pipeline(out, data, *extra):
    short = ["steps=4", "micro_batch=4", "global_batch=4", "checkpoint_every=2", "sample_every=2", "sample_count=4"]
    short += ["log_every=1", "warmup_steps=1"]
    cmd = [sys.executable, str(ROOT / "launch" / "pipeline.py"), "--data", str(data), "--out", str(out)]
    cmd += [f"--set=stage.{s}" for s in short] + list(extra)
    env = one_process_env(WANDB_MODE="offline")  # the default logging path, kept on this machine
    env.pop("RANK")  # the pipeline sets up each stage's processes itself
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_four_stages_chain_resume_and_report(tmp_path, builtin_small):
    run = pipeline(tmp_path, builtin_small)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for k, name in enumerate(STAGES):
        stage = tmp_path / name
        assert [r["step"] for r in records(stage)] == [1, 2, 3, 4]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(stage))
        net, cfg = load_consolidated(stage / "final")
        assert cfg.stage.resolution == (32 if k < 2 else 64)
        assert cfg.stage.init_from == ("" if k == 0 else str(tmp_path / STAGES[k - 1] / "final"))
        grids = sorted(p.name for p in (stage / "samples").glob("*.png"))
        assert grids == ["step_0000002.png", "step_0000004.png"]
        assert list((stage / "wandb").glob("offline-run-*")), "wandb offline files under the run"
    # stage 3 keeps an EMA: its checkpoints hold both weights, its final export is the EMA
    export = tmp_path / "tiny-stage3" / "checkpoints" / "step_0000004" / "export"
    assert (export / MODEL_FILE).is_file() and (export / EMA_FILE).is_file()
    final, _ = load_consolidated(tmp_path / "tiny-stage3" / "final")
    ema, _ = load_consolidated(export, weights_file=EMA_FILE)
    raw, _ = load_consolidated(export)
    name = "final.linear.weight"
    assert torch.equal(final.state_dict()[name], ema.state_dict()[name])
    assert not torch.equal(final.state_dict()[name], raw.state_dict()[name])
    assert "initialised from" in run.stdout or "initialised from" in run.stderr

    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["stage"] for r in report] == STAGES
    assert [r["final_weights"] for r in report] == ["raw", "raw", "ema", "ema"]
    for row in report:
        grid = Image.open(tmp_path / row["grid"])
        assert min(grid.size) >= 2 * 64 and row["images_per_s"] > 0 and row["seconds"] > 0  # 2x2 grid of 4
    assert "| tiny-stage4 | 64 | 0.0 | 4 |" in (tmp_path / "report.md").read_text()
    curves = Image.open(tmp_path / "report" / "losses.png")
    assert curves.size[0] > 300 and len(set(curves.convert("L").tobytes())) > 2  # drawn, not blank
    assert "report/losses.png" in (tmp_path / "report.md").read_text()

    again = pipeline(tmp_path, builtin_small)  # everything is done: every stage is skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 4


def test_a_half_finished_stage_resumes(tmp_path, builtin_small):
    first = pipeline(tmp_path, builtin_small, "--configs", str(ROOT / "configs/tiny/stage1.yaml"))
    assert first.returncode == 0, first.stderr[-3000:]
    stage = tmp_path / "tiny-stage1"
    import shutil

    shutil.rmtree(stage / "final")  # as if the run died after its last checkpoint
    again = pipeline(tmp_path, builtin_small, "--configs", str(ROOT / "configs/tiny/stage1.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tiny-stage1: resuming" in again.stdout and (stage / "final" / MODEL_FILE).is_file()
    assert [r["step"] for r in records(stage)] == [1, 2, 3, 4]


def test_default_expert_parallel_size_follows_the_engine(tmp_path):
    from sedit.config import ConfigError
    from sedit.pipeline import default_ep

    configs = ROOT / "ds_configs"
    assert default_ep(str(configs / "flat_dp.json"), 8, 8) == 1  # the flat engine keeps every expert everywhere
    assert default_ep(str(configs / "zero2_ep.json"), 8, 8) == 8
    assert default_ep(str(configs / "zero2_ep.json"), 6, 8) == 2
    unknown = tmp_path / "typo.json"
    unknown.write_text('{"engine": "flatt"}')
    with pytest.raises(ConfigError, match=r"typo.json: engine: 'flatt' is not one of \['deepspeed', 'flat'\]"):
        default_ep(str(unknown), 2, 8)


def test_gpus_default_to_the_flat_engine_and_a_cpu_to_deepspeed(tmp_path, monkeypatch):
    import sedit.pipeline as pipeline

    cfg = pipeline.load_stage(str(ROOT / "configs" / "xl" / "stage1.yaml"), [])
    args = pipeline.parse_args(["--configs", str(ROOT / "configs" / "xl" / "stage1.yaml"), "--out", "runs/xl"])

    def command(gpus):
        out = tmp_path / "s1"
        line = pipeline.stage_command(args, cfg, "stage1.yaml", pipeline.engine_config(args.ds, out), out, [], gpus)
        return line[line.index("--ds") + 1], line[line.index("--ep") + 1], "deepspeed.launcher.runner" in line

    monkeypatch.setattr(pipeline, "gpu_count", lambda: 4)
    assert command(4) == (str(ROOT / "ds_configs" / "flat_dp.json"), "1", True)
    assert command(1)[:2] == (str(ROOT / "ds_configs" / "flat_dp.json"), "1")
    monkeypatch.setattr(pipeline, "gpu_count", lambda: 0)
    assert command(1) == (str(ROOT / "ds_configs" / "cpu.json"), "1", False)
    args.ds = str(ROOT / "ds_configs" / "zero2_ep.json")  # a chosen config wins, and EP spans the processes
    monkeypatch.setattr(pipeline, "gpu_count", lambda: 4)
    assert command(4) == (args.ds, str(math.gcd(4, cfg.model.num_experts)), True)


def test_a_half_finished_stage_resumes_on_the_engine_it_started_with(tmp_path, monkeypatch):
    """A stage begun under another default (or another --ds) keeps its engine when the command is rerun."""
    import sedit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "gpu_count", lambda: 2)
    config = str(ROOT / "configs" / "xl" / "stage1.yaml")
    cfg, args = pipeline.load_stage(config, []), pipeline.parse_args(["--configs", config])
    out = tmp_path / "stage1"

    def chosen():
        line = pipeline.stage_command(args, cfg, config, pipeline.engine_config(args.ds, out), out, [], 2)
        return line[line.index("--ds") + 1], line[line.index("--ep") + 1]

    fresh = (str(ROOT / "ds_configs" / "flat_dp.json"), "1")
    assert chosen() == fresh
    out.mkdir()
    (out / "ds_config.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert chosen() == fresh  # no checkpoint yet: it starts over on the default
    (out / "checkpoints" / "step_0000004").mkdir(parents=True)
    assert chosen() == (str(out / "ds_config.json"), str(math.gcd(2, cfg.model.num_experts)))  # DeepSpeed: EP
    args.ds = str(ROOT / "ds_configs" / "zero3.json")
    assert chosen()[0] == args.ds  # --ds wins


def test_the_default_process_count_is_what_the_global_batch_splits_over():
    """A stage takes every GPU its batch allows: global_batch = micro_batch x processes x accumulation."""
    from sedit.pipeline import load_stage, processes_for

    xl = load_stage(str(ROOT / "configs" / "xl" / "stage1.yaml"), [])  # 2048 = 128 x processes x accumulation
    assert [processes_for(xl.stage, n) for n in (1, 2, 4, 6, 8)] == [1, 2, 4, 4, 8]
    tiny = load_stage(str(ROOT / "configs" / "tiny" / "stage1.yaml"), [])  # 32 = 32 x 1: one process
    assert processes_for(tiny.stage, 4) == 1
    halves = load_stage(str(ROOT / "configs" / "tiny" / "stage1.yaml"), ["stage.micro_batch=16"])
    assert processes_for(halves.stage, 4) == 2


def test_the_pipeline_gives_each_stage_the_gpus_its_batch_splits_over(tmp_path, monkeypatch):
    import sedit.pipeline as pipeline

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # prepared data: nothing to build
    launched = []

    def stop_after_one(command, gpus):
        launched.append((command, gpus))
        return 1  # as if the stage stopped: the pipeline ends there

    monkeypatch.setattr(pipeline, "gpu_count", lambda: 4)
    monkeypatch.setattr(pipeline, "run_forwarding_stop_signals", stop_after_one)
    for batch, processes in [("32", 1), ("64", 2), ("48", 1)]:  # 48 = 32 x 1.5: the stage itself refuses it
        argv = ["--data", str(shards), "--out", str(tmp_path / batch), f"--set=stage.global_batch={batch}"]
        assert pipeline.run(pipeline.parse_args(argv)) == 1
        command, gpus = launched.pop()
        assert gpus == processes and ("deepspeed.launcher.runner" in command) == (processes > 1), batch
