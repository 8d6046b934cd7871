"""Attention backends on the model's own attention shapes: forward + backward time of every
scaled_dot_product_attention call of one XL training step, per SDPA backend.

    python bench/attention.py --preset XL --stages 1 2 3 4

The step's attention calls are those of the patch-mixer (self- and cross-attention on all tokens),
the backbone (on the kept tokens) and the caption encoder, at each block's own head count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import STAGES, stage_config  # noqa: E402

from sedit.masking import kept_count  # noqa: E402
from sedit.model import backbone_shapes, mixer_shapes  # noqa: E402

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def attention_calls(config) -> list[tuple[int, int, int, int]]:
    """(images, heads, query tokens, key tokens) of every attention call in one forward of a stage's
    config (``train_step.stage_config``)."""
    cfg, n = config.model, config.stage.micro_batch
    tokens = (config.stage.resolution // config.stage.latent_downsample // cfg.patch_size) ** 2
    mask = config.stage.mask_ratio
    kept = kept_count(tokens, mask) if mask > 0 else tokens
    heads = lambda width: width // cfg.head_dim  # noqa: E731
    calls = [(n, heads(cfg.width), cfg.caption_len, cfg.caption_len)]  # caption encoder
    for shape in mixer_shapes(cfg):
        calls += [(n, heads(shape.attn_dim), tokens, tokens), (n, heads(shape.dim), tokens, cfg.caption_len)]
    for shape in backbone_shapes(cfg):
        calls += [(n, heads(shape.attn_dim), kept, kept), (n, heads(shape.dim), kept, cfg.caption_len)]
    return calls


def time_backend(calls, backend, head_dim: int, reps: int = 10) -> float:
    """Milliseconds of forward + backward over all calls, median of ``reps``."""
    tensors = []
    for n, h, tq, tk in calls:
        q = torch.randn(n, h, tq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n, h, tk, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n, h, tk, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tensors.append((q, k, v, torch.randn(n, h, tq, head_dim, device="cuda", dtype=torch.bfloat16)))

    def run():  # gradients returned, not accumulated into .grad (no extra add kernels timed)
        with sdpa_kernel(backend):
            for q, k, v, grad in tensors:
                torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)

    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=sorted(STAGES))
    parser.add_argument("--json", default=None, help="append JSON lines here")
    args = parser.parse_args()
    head = "| stage | calls | " + " | ".join(f"{name} ms" for name in BACKENDS) + " |"
    lines = [head, "|---" * (len(BACKENDS) + 2) + "|"]
    for stage in args.stages:
        config = stage_config(args.preset, stage, None, 1)
        calls, head_dim = attention_calls(config), config.model.head_dim
        row = {"preset": args.preset, "stage": stage, "calls": len(calls), "gpu": torch.cuda.get_device_name()}
        for name, backend in BACKENDS.items():
            try:
                row[f"{name}_ms"] = time_backend(calls, backend, head_dim)
            except RuntimeError as err:  # a backend that refuses these shapes
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = str(err).splitlines()[0]
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        cells = [f"{row[f'{name}_ms']:.1f}" if row[f"{name}_ms"] else "refused" for name in BACKENDS]
        lines.append(f"| {stage} | {len(calls)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
