"""sedit.generate: output files and sizes, per-seed pixels, EMA choice, checkpoint resolution, encoders."""

import json
import shutil

import numpy as np
import pytest
import yaml
from data_helpers import tiny_encoders, write_images
from eval_helpers import save_export
from PIL import Image
from safetensors.torch import load_file, save_file

from sedit.checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, load_consolidated, resolve_export
from sedit.data.encoders import save_tiny_text_encoder
from sedit.data.prepare import prepare
from sedit.data.shards import FORMAT
from sedit.data.sources import folder_items
from sedit.generate import main

SIDE = 32  # the test exports' stage.resolution: 8x8 latents x the tiny VAE's downsampling 4


def with_stage(source, target, **stage):
    """A copy of the export ``source`` whose config's stage section has ``stage`` overrides."""
    target.mkdir(parents=True)
    shutil.copy(source / MODEL_FILE, target / MODEL_FILE)
    raw = yaml.safe_load((source / CONFIG_FILE).read_text())
    raw["stage"].update(stage)
    (target / CONFIG_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    vae, text = tiny_encoders(base)
    plain = save_export(base / "plain")  # model.safetensors + config.yaml only
    final = base / "run" / "final"
    shutil.copytree(plain, final)
    ema = load_file(str(plain / MODEL_FILE))
    ema["final.linear.weight"] = ema["final.linear.weight"] * 3  # EMA weights that visibly differ
    save_file(ema, str(final / EMA_FILE))

    write_images(base / "images", 4)
    prepare(
        folder_items(base / "images"),
        base / "data",
        vae=vae,
        text_encoder=text,
        resolutions=(SIDE,),
        workers=1,
        progress=False,
    )
    with_stage(plain, base / "with_data", data="data")  # relative to the working directory
    return {"base": base, "vae": vae, "text": text, "plain": plain, "final": final}


def sample(setup, out, *extra, ckpt=None, encoders=True):
    argv = ["--ckpt", str(ckpt or setup["plain"]), "--steps", "2", "--cfg", "2", "--device", "cpu", "--out", str(out)]
    if encoders:
        argv += ["--vae", setup["vae"], "--text-encoder", setup["text"]]
    return main(argv + list(extra))


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_one_prompt_writes_one_image_at_latent_side_times_vae_downsampling(setup, tmp_path):
    out = tmp_path / "apple.png"
    assert sample(setup, out, "--prompt", "a red apple") == [out]
    assert Image.open(out).size == (SIDE, SIDE) and Image.open(out).mode == "RGB"
    sample(setup, tmp_path / "big.png", "--prompt", "a red apple", "--resolution", "64")
    assert Image.open(tmp_path / "big.png").size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apple.png", "big.png"]  # no temporary files left


def test_prompts_file_gives_one_png_per_prompt_a_grid_and_prompts_json(setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\n  a blue car \ntwo dogs\n\n")
    out = tmp_path / "samples"
    written = sample(setup, out, "--prompts-file", str(prompts), "--seed", "7", "--batch-size", "2")
    names = ["0000.png", "0001.png", "0002.png", "grid.png", "prompts.json"]
    assert sorted(p.name for p in out.iterdir()) == names and sorted(p.name for p in written) == names
    record = json.loads((out / "prompts.json").read_text())
    assert [(i["index"], i["prompt"], i["seed"]) for i in record["images"]] == [
        (0, "a red apple", 7),
        (1, "a blue car", 8),
        (2, "two dogs", 9),
    ]
    first = pixels(out / "0000.png")
    assert first.shape == (SIDE, SIDE, 3)
    # the grid tiles the images, 2 per row, enlarged 2x (nearest) to 64 px, 2 px apart
    grid = pixels(out / "grid.png")
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)
    assert (grid[2:66:2, 2:66:2] == first).all()
    # image 1 depends on its prompt and seed only, not on the batch it was drawn in
    sample(setup, tmp_path / "car.png", "--prompt", "a blue car", "--seed", "8")
    assert np.abs(pixels(tmp_path / "car.png") - pixels(out / "0001.png")).max() <= 1


def test_several_prompts_with_a_png_out_write_only_the_grid(setup, tmp_path):
    out = tmp_path / "grid.png"
    assert sample(setup, out, "--prompt", "a red apple", "--prompt", "a blue car") == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    assert Image.open(out).size == (2 * 66 + 2, 66 + 2)


def test_same_seed_same_pixels_other_seed_other_pixels(setup, tmp_path):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        sample(setup, tmp_path / f"{name}.png", "--prompt", "a lighthouse", "--seed", seed)
    a, b, c = (pixels(tmp_path / f"{name}.png") for name in "abc")
    assert (a == b).all()
    assert np.abs(a - c).mean() > 1


def test_ema_weights_are_preferred_and_raw_picks_the_trained_weights(setup, tmp_path):
    ema, _ = load_consolidated(setup["final"], weights_file=EMA_FILE)
    raw, _ = load_consolidated(setup["final"])
    assert (ema.final.linear.weight == 3 * raw.final.linear.weight).all()
    images = {}
    for name, extra in (("default", []), ("ema", ["--weights", "ema"]), ("raw", ["--weights", "raw"])):
        sample(setup, tmp_path / f"{name}.png", "--prompt", "a red apple", *extra, ckpt=setup["final"])
        images[name] = pixels(tmp_path / f"{name}.png")
    sample(setup, tmp_path / "plain.png", "--prompt", "a red apple")  # an export without EMA: its model file
    assert (images["default"] == images["ema"]).all()
    assert np.abs(images["raw"] - images["ema"]).mean() > 1
    assert (images["raw"] == pixels(tmp_path / "plain.png")).all()
    with pytest.raises(SystemExit, match=EMA_FILE):
        sample(setup, tmp_path / "x.png", "--prompt", "a", "--weights", "ema")


def test_resolve_export_finds_final_then_latest_checkpoint_then_tag_export(setup, tmp_path):
    final = setup["final"]
    assert resolve_export(final) == (final, EMA_FILE)
    assert resolve_export(final, "raw") == (final, MODEL_FILE)
    assert resolve_export(final.parent) == (final, EMA_FILE)  # run directory with final/
    assert resolve_export(setup["plain"]) == (setup["plain"], MODEL_FILE)

    run = tmp_path / "run"
    for tag in ("step_5", "step_10"):
        shutil.copytree(setup["plain"], run / "checkpoints" / tag / "export")
    (run / "checkpoints" / "latest").write_text("step_10\n")
    newest = run / "checkpoints" / "step_10" / "export"
    assert resolve_export(run) == (newest, MODEL_FILE)
    assert resolve_export(run / "checkpoints") == (newest, MODEL_FILE)
    assert resolve_export(run / "checkpoints" / "step_5")[0] == run / "checkpoints" / "step_5" / "export"
    shutil.copytree(setup["plain"], run / "final")
    assert resolve_export(run) == (run / "final", MODEL_FILE)  # a finished run's final/ comes first

    with pytest.raises(FileNotFoundError, match="checkpoints/latest") as err:
        resolve_export(tmp_path / "empty_run")
    assert str(tmp_path / "empty_run") in str(err.value)


def test_cli_samples_the_latest_checkpoint_of_a_run_without_final(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["plain"], run / "checkpoints" / "step_10" / "export")
    (run / "checkpoints" / "latest").write_text("step_10")
    sample(setup, tmp_path / "run.png", "--prompt", "a red apple", ckpt=run)
    sample(setup, tmp_path / "plain.png", "--prompt", "a red apple")
    assert (pixels(tmp_path / "run.png") == pixels(tmp_path / "plain.png")).all()


def test_bad_ckpt_path_exits_naming_the_path(setup, tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=str(missing)) as err:
        sample(setup, tmp_path / "x.png", "--prompt", "a", ckpt=missing)
    assert MODEL_FILE in str(err.value)


def test_encoders_default_to_the_manifest_of_stage_data(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup["base"])  # stage.data is relative: read from the working directory
    ckpt = setup["base"] / "with_data"
    sample(setup, tmp_path / "manifest.png", "--prompt", "a red apple", ckpt=ckpt, encoders=False)
    sample(setup, tmp_path / "given.png", "--prompt", "a red apple", ckpt=ckpt)
    assert (pixels(tmp_path / "manifest.png") == pixels(tmp_path / "given.png")).all()


def test_missing_manifest_or_hub_encoders_ask_for_local_encoders(setup, tmp_path):
    with pytest.raises(SystemExit, match="--vae and --text-encoder"):  # stage.data is empty
        sample(setup, tmp_path / "x.png", "--prompt", "a", encoders=False)
    hub = tmp_path / "hub_data"
    hub.mkdir()
    names = {"vae": {"name": "stabilityai/sdxl-vae"}, "text_encoder": {"name": "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"}}
    (hub / "manifest.json").write_text(json.dumps({"format": FORMAT, **names}))
    ckpt = with_stage(setup["plain"], tmp_path / "hub_export", data=str(hub))
    with pytest.raises(SystemExit, match="allow-download"):
        sample(setup, tmp_path / "x.png", "--prompt", "a", ckpt=ckpt, encoders=False)


def test_text_encoder_width_must_match_caption_dim(setup, tmp_path):
    wide = save_tiny_text_encoder(tmp_path / "wide_text", width=48)
    with pytest.raises(SystemExit, match="caption_dim"):
        sample(setup, tmp_path / "x.png", "--prompt", "a", "--text-encoder", str(wide))
