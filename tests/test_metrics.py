import json
import math
import re

import pytest
import torch
import torch.multiprocessing as mp
from dist_workers import free_port

from sedit.config import build_config
from sedit.masking import kept_count, random_keep_indices
from sedit.metrics import (
    MetricsLog,
    forget_routing,
    memory_stats,
    moe_expert_load,
    moe_layers,
    moe_statistics,
    reduce_mean,
)
from sedit.model import build_model
from sedit.moe.routing import expert_capacity

# ----------------------------------------------------------------------------------------------
# Routing statistics on a real forward
# ----------------------------------------------------------------------------------------------

BATCH, GRID, MASK_RATIO = 3, 8, 0.75  # 8x8 latents, patch 2: 16 tokens; the backbone keeps 4


def tiny_forward(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, cfg.in_channels, GRID, GRID, generator=g)
    captions = torch.randn(BATCH, cfg.caption_len, cfg.caption_dim, generator=g)
    tokens = (GRID // cfg.patch_size) ** 2
    keep = random_keep_indices(BATCH, tokens, MASK_RATIO, g)
    with torch.no_grad():
        model(x, torch.randn(BATCH, generator=g), captions, keep)


@pytest.fixture
def routed_model(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    torch.nn.init.normal_(model.blocks[1].ffn.router.weight.weight, std=1.0)  # a confident router too
    tiny_forward(model)
    return model


def test_statistics_per_layer_named_by_block(routed_model):
    stats = moe_statistics(routed_model)
    assert [name for name, _ in moe_layers(routed_model)] == ["mixer01", "block01"]
    per_layer = {"router_entropy", "dropped_fraction", "experts_per_token", "tokens_per_expert", "importance_cv"}
    expected = {f"moe/{layer}/{s}" for layer in ("mixer01", "block01") for s in per_layer}
    assert set(stats) == expected | {"moe/router_entropy", "moe/dropped_fraction"}
    assert all(v.dim() == 0 for v in stats.values())


def test_statistics_match_hand_counts(routed_model, tiny_cfg):
    stats = moe_statistics(routed_model)
    e, capacity = tiny_cfg.num_experts, tiny_cfg.capacity
    tokens = (GRID // tiny_cfg.patch_size) ** 2
    kept = kept_count(tokens, MASK_RATIO)
    tokens_seen = {"mixer01": tokens, "block01": kept}  # the backbone routes the kept tokens only
    for name, layer in moe_layers(routed_model):
        t = tokens_seen[name]
        index = layer.last_routing.token_index  # (N, E, C)
        assert 0 < stats[f"moe/{name}/router_entropy"] <= math.log(e) + 1e-6
        assert stats[f"moe/{name}/tokens_per_expert"] == expert_capacity(t, e, capacity) * BATCH
        assert stats[f"moe/{name}/experts_per_token"] == pytest.approx(expert_capacity(t, e, capacity) * e / t)
        dropped = sum(t - len(set(index[n].flatten().tolist())) for n in range(BATCH))
        assert stats[f"moe/{name}/dropped_fraction"].item() == pytest.approx(dropped / (BATCH * t))
    mean = (stats["moe/mixer01/router_entropy"] + stats["moe/block01/router_entropy"]) / 2
    torch.testing.assert_close(stats["moe/router_entropy"], mean)
    # router at init (std 0.02) is near uniform; the block01 router was made confident
    assert stats["moe/mixer01/router_entropy"] > stats["moe/block01/router_entropy"]
    assert stats["moe/mixer01/importance_cv"] < stats["moe/block01/importance_cv"]


def test_expert_load_vectors(routed_model, tiny_cfg):
    load = moe_expert_load(routed_model)
    importance = load["moe/mixer01/importance"]
    assert importance.shape == (tiny_cfg.num_experts,)
    assert importance.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (load["moe/mixer01/tokens"] == expert_capacity(16, 4, 2.0) * BATCH).all()


def test_forget_routing_clears_state_until_the_next_forward(routed_model):
    layers = [layer for _, layer in moe_layers(routed_model)]
    assert all(layer.last_routing is not None for layer in layers)
    before = moe_statistics(routed_model)
    forget_routing(routed_model)
    assert all(layer.last_routing is None for layer in layers)
    assert moe_statistics(routed_model) == {}
    tiny_forward(routed_model, seed=1)  # the latest forward's routing, not the forgotten one
    after = moe_statistics(routed_model)
    assert after.keys() == before.keys()
    assert after["moe/block01/router_entropy"] != before["moe/block01/router_entropy"]


def test_expert_parallel_layer_is_found():
    from sedit.moe.expert_parallel import ExpertChoiceEPLayer  # imports DeepSpeed

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), ExpertChoiceEPLayer(16, 32, 4, 2.0, True, 1, 0))
    model(torch.randn(2, 8, 16))
    stats = moe_statistics(model)
    assert stats["moe/layer00/tokens_per_expert"] == expert_capacity(8, 4, 2.0) * 2


# ----------------------------------------------------------------------------------------------
# reduce_mean over two gloo processes, memory
# ----------------------------------------------------------------------------------------------


def _reduce_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    values = {"loss": torch.tensor(1.0 + rank), "lr": 0.1, "stat": torch.tensor([10.0 * rank])}
    result = reduce_mean(values)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_reduce_mean_averages_over_ranks(tmp_path):
    # fork: the workers inherit the imported torch (a spawned one spends seconds importing it again)
    mp.start_processes(_reduce_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert list(result) == ["loss", "lr", "stat"]
        assert result == {"loss": 1.5, "lr": 0.1, "stat": 5.0}


def test_reduce_mean_without_process_group():
    assert reduce_mean({"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
    with pytest.raises(ValueError, match="'v'"):
        reduce_mean({"v": torch.ones(2)})


def test_memory_stats_cpu():
    stats = memory_stats("cpu")
    assert list(stats) == ["mem/rss_peak_gib"] and stats["mem/rss_peak_gib"] > 0


# ----------------------------------------------------------------------------------------------
# MetricsLog: metrics.jsonl, console, wandb
# ----------------------------------------------------------------------------------------------


def stage_cfg(wandb="disabled"):
    return build_config({"preset": "tiny", "stage": {"name": "test-stage", "steps": 10, "wandb": wandb}})


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb offline, quiet, and with every one of its own folders under tmp_path."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    return tmp_path


def steps_in(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_records_and_console(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricsLog(tmp_path, stage_cfg(), start_step=0, total_steps=10) as log:
        log.log(1, {"loss": torch.tensor(0.5), "images_per_s": 12.345678, "moe/block01/router_entropy": 1.2})
        log.advance()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 1, "loss": 0.5, "images_per_s": 12.345678, "moe/block01/router_entropy": 1.2}
    assert line.startswith('{"step": 1')
    printed = capsys.readouterr().out
    assert '{"step":1,"loss":0.5,"images_per_s":12.35}' in printed  # per-layer MoE keys stay in the file
    assert not (tmp_path / "wandb").exists()


def test_resume_trims_records_of_lost_steps(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricsLog(tmp_path, stage_cfg()) as log:
        for step in range(1, 11):
            log.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # torn by a kill
    with MetricsLog(tmp_path, stage_cfg(), start_step=6) as log:
        log.log(7, {"loss": 0.1})
    assert steps_in(tmp_path) == [1, 2, 3, 4, 5, 6, 7]


def test_only_the_main_rank_writes(tmp_path):
    with MetricsLog(tmp_path / "run", stage_cfg("offline"), main=False) as log:
        log.log(1, {"loss": 1.0})
        log.advance()
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_under_run_dir_and_resumed(wandb_env):
    run_dir = wandb_env / "run"
    with MetricsLog(run_dir, stage_cfg("offline"), total_steps=10) as log:
        log.log(1, {"loss": 1.0})
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    with MetricsLog(run_dir, stage_cfg("offline"), start_step=1, total_steps=10) as log:
        log.log(2, {"loss": 0.5})
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>; wandb appends -1, -2 when two runs start within the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    assert sorted(p.name for p in wandb_env.iterdir()) == ["run", "wandb-home"]


def test_wandb_mode_from_environment_wins(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLog(wandb_env / "run", stage_cfg("offline")) as log:
        log.log(1, {"loss": 1.0})
    assert not (wandb_env / "run" / "wandb").exists()


def test_wandb_failure_warns_and_training_goes_on(wandb_env, monkeypatch, capsys):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with MetricsLog(wandb_env / "run", stage_cfg("online")) as log:
        log.log(1, {"loss": 1.0})
    assert "wandb (online) did not start" in capsys.readouterr().err
    assert steps_in(wandb_env / "run") == [1]
