"""Every shipped run config loads and validates, so none can rot."""

from pathlib import Path

import pytest

from sedit.config import load_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.stage.global_batch % cfg.stage.micro_batch == 0


def test_xl_recipe_matches_reference():
    root = Path(__file__).resolve().parents[1] / "configs" / "xl"
    stages = [load_config(root / f"stage{i}.yaml") for i in (1, 2, 3, 4)]
    assert [s.stage.resolution for s in stages] == [256, 256, 512, 512]
    assert [s.stage.mask_ratio for s in stages] == [0.75, 0.0, 0.75, 0.0]
    assert [s.stage.steps for s in stages] == [250000, 30000, 50000, 5000]
    assert [s.stage.grad_clip for s in stages] == [0.25, 0.25, 0.5, 0.5]
    assert stages[0].diffusion.p_mean == -0.6 and stages[2].diffusion.p_std == 0.6
    assert all(s.model.width == 1024 and s.stage.global_batch == 2048 for s in stages)
    for prev, nxt in zip(stages, stages[1:], strict=False):
        assert nxt.stage.init_from.endswith(f"{prev.stage.name}/final")


@pytest.mark.parametrize("preset", ["tiny", "S", "B", "L", "XL"])
def test_every_preset_has_a_four_stage_chain(preset):
    from sedit.presets import PRESETS

    root = Path(__file__).resolve().parents[1] / "configs" / preset.lower()
    stages = [load_config(root / f"stage{i}.yaml") for i in (1, 2, 3, 4)]
    assert all(s.model == PRESETS[preset] for s in stages if preset != "tiny")
    assert [s.stage.mask_ratio for s in stages] == [0.75, 0.0, 0.75, 0.0]
    low, high = stages[0].stage.resolution, stages[2].stage.resolution
    assert stages[1].stage.resolution == low and stages[3].stage.resolution == high == 2 * low
    if preset != "tiny":  # the pipeline sets init_from itself; the SLURM chain reads these
        run = "runs/" + preset.lower()
        for prev, nxt in zip(stages, stages[1:], strict=False):
            assert nxt.stage.init_from == f"{run}/{prev.stage.name}/final"
