"""bench/cost_projection.py: the recipe's images and the measured rates give GPU-hours, days and cost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sedit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cost_projection", ROOT / "bench" / "cost_projection.py")
cost_projection = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost_projection)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def row(
    stage: int,
    rate: float,
    setup: str = "deepspeed zero2_ep.json ep=2",
    gpu: str = "NVIDIA H200",
    micro_batch: int = 64,
) -> dict:
    return {
        "stage": stage,
        "setup": setup,
        "gpu": gpu,
        "world_size": 2,
        "images_per_s_per_gpu": rate,
        "micro_batch": micro_batch,
    }


def test_projection_follows_the_recipe_and_the_last_matching_measurement(tmp_path, capsys):
    old = write_rows(tmp_path / "old.jsonl", [row(1, 100.0), row(2, 50.0)])
    new = write_rows(tmp_path / "new.jsonl", [row(1, 400.0), row(1, 900.0, setup="other"), row(2, 80.0, gpu="H100")])
    plan = cost_projection.main([old, new, "--setup", "deepspeed zero2_ep.json ep=2", "--gpu", "H200", "--gpus", "4"])

    stage1 = load_config(ROOT / "configs" / "xl" / "stage1.yaml").stage
    assert plan[0]["images"] == stage1.steps * stage1.global_batch == 250_000 * 2048
    assert plan[0]["images_per_s_per_gpu"] == 400.0  # the newer file wins; other setups are ignored
    assert plan[0]["gpu_hours"] == pytest.approx(512e6 / 400 / 3600)
    assert plan[0]["days"] == pytest.approx(plan[0]["gpu_hours"] / 4 / 24)
    assert plan[0]["cost"] == pytest.approx(plan[0]["gpu_hours"] * 2.0)
    assert plan[1]["images_per_s_per_gpu"] == 50.0  # the H100 row does not pass --gpu H200
    assert "gpu_hours" not in plan[2] and "gpu_hours" not in plan[3]
    table = capsys.readouterr().out
    assert "| 3 | 50,000 x 2,048 | 102.4M | not measured |" in table
    assert "| total (stages 1, 2 only) |" in table


def test_bad_lines_and_missing_setups_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(row(1, 1.0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not a JSON line"):
        cost_projection.measured_rates([str(broken)], "x")
    good = write_rows(tmp_path / "good.jsonl", [row(1, 1.0)])
    with pytest.raises(SystemExit):
        cost_projection.main([good, "--setup", "single GPU"])


def test_micro_batch_picks_rows_per_stage(tmp_path, capsys):
    rows = [row(1, 100.0, micro_batch=128), row(1, 120.0, micro_batch=256), row(2, 50.0, micro_batch=64)]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    setup = ["--setup", "deepspeed zero2_ep.json ep=2"]
    assert cost_projection.main([path, *setup])[0]["images_per_s_per_gpu"] == 120.0  # the last row
    plan = cost_projection.main([path, *setup, "--micro-batch", "1=128", "--micro-batch", "2=64"])
    assert [e.get("images_per_s_per_gpu") for e in plan] == [100.0, 50.0, None, None]
    assert "| 100 (micro-batch 128, 2 x NVIDIA H200 (rows.jsonl)) |" in capsys.readouterr().out
    assert "gpu_hours" not in cost_projection.main([path, *setup, "--micro-batch", "2=32"])[1]
    for wrong in ("one=128", "7=128"):
        with pytest.raises(SystemExit):
            cost_projection.main([path, *setup, "--micro-batch", wrong])
    with pytest.raises(SystemExit):
        cost_projection.main([path, *setup, "--micro-batch", "1=512", "--micro-batch", "2=512"])
    assert "and micro-batches 1=512, 2=512" in capsys.readouterr().err


trainer_spec = importlib.util.spec_from_file_location("trainer_rate", ROOT / "bench" / "trainer_rate.py")
trainer_rate = importlib.util.module_from_spec(trainer_spec)
trainer_spec.loader.exec_module(trainer_rate)


def test_trainer_rate_leaves_out_the_first_interval_and_feeds_the_projection(tmp_path, capsys):
    # the first interval holds the compile; here it is not the slowest, so only "the first" removes it
    logged = [{"step": 5, "loss": 1.0, "images_per_s": 4200.0}, {"step": 7, "loss": 1.0}]  # a line without a rate
    logged += [{"step": 5 * k, "images_per_s": rate} for k, rate in enumerate((4100.0, 4140.0, 3000.0, 4120.0), 2)]
    metrics = write_rows(tmp_path / "metrics.jsonl", logged)
    setup = "trainer flat_dp.json, 256 images per GPU per step"
    args = [metrics, "--stage", "1", "--world-size", "4", "--gpu", "NVIDIA H200", "--setup", setup]
    line = trainer_rate.main(args)
    assert line["images_per_s_total"] == 4110.0  # median of 4100, 4140, 3000, 4120
    assert line["images_per_s_per_gpu"] == pytest.approx(1027.5)
    assert (line["intervals"], line["interval_min"], line["interval_max"]) == (4, 3000.0, 4140.0)
    stage1 = load_config(ROOT / "configs" / "xl" / "stage1.yaml").stage
    assert (line["micro_batch"], line["resolution"], line["mask_ratio"]) == (
        stage1.micro_batch,
        stage1.resolution,
        stage1.mask_ratio,
    )
    assert "global_batch" not in line  # the recipe's file does not know what the run used
    rates = write_rows(tmp_path / "rates.jsonl", [json.loads(capsys.readouterr().out)])
    plan = cost_projection.main([rates, "--setup", setup, "--gpus", "8"])
    assert plan[0]["gpu_hours"] == pytest.approx(512e6 / 1027.5 / 3600)
    assert "4 x NVIDIA H200 (rates.jsonl)" in capsys.readouterr().out


def test_trainer_rate_reads_the_run_config(tmp_path):
    run_config = tmp_path / "config.yaml"
    run_config.write_text("inherit: " + str(ROOT / "configs" / "xl" / "stage2.yaml") + "\n"
                          "stage: {micro_batch: 32, global_batch: 512}\n")  # fmt: skip
    metrics = write_rows(tmp_path / "m.jsonl", [{"step": s, "images_per_s": 10.0 * s} for s in (5, 10, 15)])
    line = trainer_rate.trainer_row(Path(metrics), 2, 4, "GPU", "x", config=run_config)
    assert (line["micro_batch"], line["global_batch"], line["accumulation"]) == (32, 512, 4)
    assert line["images_per_s_total"] == 125.0 and line["mask_ratio"] == 0.0


def test_trainer_rate_names_what_it_cannot_use(tmp_path, capsys):
    only_compile = write_rows(tmp_path / "short.jsonl", [{"step": 5, "images_per_s": 30.0}])
    with pytest.raises(ValueError, match=r"short.jsonl: 1 logged interval\(s\); at least 2"):
        trainer_rate.trainer_row(Path(only_compile), 1, 1, "GPU", "x")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 5, "images_per_s": 30.0}\n{"step": 10,\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not a JSON line"):
        trainer_rate.interval_rates(broken)
    common = ["--stage", "1", "--gpu", "GPU", "--setup", "x"]
    for path, world, message in [
        (broken, "0", "--world-size must be at least 1"),
        (broken, "1", "broken.jsonl:2: not a JSON line"),
        (tmp_path / "missing.jsonl", "1", "missing.jsonl"),
    ]:
        with pytest.raises(SystemExit) as stop:
            trainer_rate.main([str(path), "--world-size", world, *common])
        assert stop.value.code == 2 and message in capsys.readouterr().err
