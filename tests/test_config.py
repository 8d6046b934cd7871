import pytest

from sedit.config import ConfigError, build_config, load_config, parse_override


def test_preset_and_overrides_resolve():
    cfg = build_config({"preset": "tiny", "model": {"depth": 3}, "stage": {"lr": 1e-3, "resolution": 64}})
    assert cfg.model.depth == 3 and cfg.model.width == 64 and cfg.stage.lr == 1e-3


@pytest.mark.parametrize(
    "data, key",
    [
        ({"stage": {"lr_typo": 1}}, "stage.lr_typo"),
        ({"model": {"depth": "deep"}}, "model.depth"),
        ({"model": {"depth": 2.5}}, "model.depth"),
        ({"model": {"expert_gated": 1}}, "model.expert_gated"),
        ({"model": {"attn_ratio": [0.5]}}, "model.attn_ratio"),
        ({"stage": {"mask_ratio": 1.5}}, "stage.mask_ratio"),
        ({"stage": "nope"}, "stage"),
        ({"bogus": 1}, "bogus"),
        ({"preset": "XXL"}, "preset"),
        ({"model": {"width": 100, "head_dim": 64}}, "model.width"),
    ],
)
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        build_config(data, "run.yaml")


def test_int_is_accepted_for_float_and_list_for_tuple():
    cfg = build_config({"stage": {"lr": 1, "betas": [0.9, 0.95]}})
    assert cfg.stage.lr == 1.0 and isinstance(cfg.stage.lr, float) and cfg.stage.betas == (0.9, 0.95)


def test_yaml_file_with_inherit_and_error_names_file(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: tiny\nstage:\n  lr: 0.001\n  resolution: 64\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\nstage:\n  mask_ratio: 0.0\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.stage.lr == 0.001 and cfg.stage.mask_ratio == 0.0 and cfg.model.width == 64
    (tmp_path / "bad.yaml").write_text("inherit: base.yaml\nstage:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: stage.stepz: unknown key"):
        load_config(tmp_path / "bad.yaml")
    cfg = load_config(tmp_path / "child.yaml", parse_override("stage.steps=7"))
    assert cfg.stage.steps == 7


def test_exponent_without_a_dot_is_a_number():
    from sedit.config import build_config, parse_override

    cfg = build_config({"stage": {"lr": "1e-4", "lr_final": "2E+1"}, **parse_override("diffusion.p_std=1e0")})
    assert cfg.stage.lr == 1e-4 and cfg.stage.lr_final == 20.0 and cfg.diffusion.p_std == 1.0
    with pytest.raises(ConfigError, match="stage.lr: expected a number, got 'fast'"):
        build_config({"stage": {"lr": "fast"}})
