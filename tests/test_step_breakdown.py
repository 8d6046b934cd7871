"""bench/step_breakdown.py and the accumulation / MoE-load parts of bench/train_step.py, on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


step_breakdown = load_bench("step_breakdown")
train_step = load_bench("train_step")


def kernel(name: str, start: float, end: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start}


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all_to_all"),
        ("ncclKernel_AllToAll_RING_LL", "all_to_all"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collectives"),
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "collectives"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collectives"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "compute"),
        ("Memcpy DtoD (Device -> Device)", "compute"),
    ],
)
def test_kernels_are_classified_by_name(name, kind):
    assert step_breakdown.kernel_class(name) == kind


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", "matmul"),
        ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
        ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*)", "attention"),
        ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", "attention"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer and clipping"),
        ("void at::native::sbtopk::gatherTopK<float, unsigned int, 3, false>", "routing and indexing"),
        ("void at::native::indexFuncLargeIndex<c10::BFloat16, long>", "routing and indexing"),
        ("triton_per_fused_add_mul_native_layer_norm_0", "fused elementwise (compiled)"),
        ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "other elementwise and copies"),
        ("Memcpy DtoD (Device -> Device)", "other elementwise and copies"),
    ],
)
def test_compute_kernels_are_split_by_kind(name, kind):
    assert step_breakdown.compute_kind(name) == kind


def test_union_length_counts_overlaps_once():
    assert step_breakdown.union_length([]) == 0
    assert step_breakdown.union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert step_breakdown.union_length([(3, 4), (0, 10)]) == 10


def test_breakdown_splits_the_window_into_parts_that_add_up():
    events = [
        kernel("sm90_xmma_gemm_bf16", 0, 100),
        kernel("ncclDevKernel_SendRecv", 80, 130),  # 30 us of it after compute ends: exposed
        kernel("ncclDevKernel_AllGather_RING_LL", 90, 140),  # exposed only where neither runs: 130..140
        kernel("Memcpy HtoD", 160, 170, cat="gpu_memcpy"),
        kernel("elementwise", 200, 300),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},  # host events are ignored
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 500},
    ]
    parts = step_breakdown.breakdown(events, steps=2)  # per step: everything halved, in ms
    us = 1e-3 / 2
    assert parts["window_ms"] == pytest.approx(300 * us)
    assert parts["compute_ms"] == pytest.approx(210 * us)
    assert parts["exposed_all_to_all_ms"] == pytest.approx(30 * us)
    assert parts["exposed_collectives_ms"] == pytest.approx(10 * us)
    assert parts["idle_ms"] == pytest.approx(50 * us)  # 140..160 and 170..200
    total = parts["compute_ms"] + parts["exposed_all_to_all_ms"] + parts["exposed_collectives_ms"] + parts["idle_ms"]
    assert total == pytest.approx(parts["window_ms"])
    assert parts["all_to_all_ms"] == pytest.approx(50 * us)
    assert parts["collectives_ms"] == pytest.approx(50 * us)
    assert parts["kernels"] == 2.5
    # summed kernel time of compute kernels only, per kind, per step
    assert parts["compute_by_kind_ms"] == pytest.approx({"matmul": 100 * us, "other elementwise and copies": 110 * us})
    assert list(parts["compute_by_kind_ms"]) == ["other elementwise and copies", "matmul"]  # largest first
    assert parts["top_kernels_ms"] == pytest.approx(
        {"elementwise": 100 * us, "sm90_xmma_gemm_bf16": 100 * us, "Memcpy HtoD": 10 * us}
    )
    assert len(step_breakdown.breakdown(events, steps=2, top=1)["top_kernels_ms"]) == 1


def test_breakdown_refuses_a_trace_without_gpu_activity():
    with pytest.raises(ValueError, match="no GPU activity"):
        step_breakdown.breakdown([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])


def setup_args(*argv: str) -> argparse.Namespace:
    """The set-up options as bench/train_step.py parses them (every option present, defaults filled)."""
    parser = argparse.ArgumentParser()
    train_step.add_setup_arguments(parser)
    return parser.parse_args(list(argv))


def tiny_runner(global_batch: int):
    cfg = train_step.stage_config("tiny", 1, 2, 1, global_batch)
    return cfg, train_step.make_step(cfg, setup_args(), torch.device("cpu"))


def test_one_step_accumulates_the_micro_batches_of_the_global_batch_and_steps_once():
    torch.manual_seed(0)
    cfg, runner = tiny_runner(global_batch=6)
    assert runner.accumulation == 3
    before = [p.detach().clone() for p in runner.model.parameters()]
    calls = []
    micro_step = runner.micro_step
    runner.micro_step = lambda last: calls.append(last) or micro_step(last)
    loss = runner.step()
    assert calls == [False, False, True]
    assert torch.isfinite(loss)
    moved = [not torch.equal(a, p) for a, p in zip(before, runner.model.parameters(), strict=True)]
    assert any(moved)
    with pytest.raises(Exception, match="not a multiple of micro_batch"):
        tiny_runner(global_batch=5)


def test_moe_load_reports_every_layer_with_expert_choice_invariants():
    torch.manual_seed(0)
    cfg, runner = tiny_runner(global_batch=2)
    rows = train_step.moe_load(runner)
    layers = [layer for _, layer in train_step.moe_layers(runner.model)]
    assert len(rows) == len(layers) > 0
    for row, layer in zip(rows, layers, strict=True):
        assert layer.last_routing is None  # forgotten again after reading
        tokens = row["tokens_per_expert_min"]
        assert tokens == row["tokens_per_expert_max"] > 0  # every expert is exactly full
        assert 0 <= row["dropped_fraction"] < 1
        assert row["importance_max_over_min"] >= 1
        assert 0 < row["router_entropy"] <= torch.log(torch.tensor(float(cfg.model.num_experts))).item() + 1e-6


def test_kinds_table_shows_rank_zeros_time_and_share_per_kind():
    by_kind = {"matmul": 30.0, "attention": 10.0}
    rows = [
        {"stage": 1, "setup": "compiled", "breakdown_per_rank": [{"compute_by_kind_ms": by_kind}, {}]},
        {"stage": 2, "setup": "no profile"},
    ]
    lines = step_breakdown.kinds_markdown(rows).splitlines()
    assert len(lines) == 3  # header, rule, the one profiled set-up
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:4] == ["1", "compiled", "10.0 (25%)", "30.0 (75%)"]  # attention, then matmul
    assert cells[4:] == ["0.0 (0%)"] * 4


def test_attention_bench_lists_every_attention_call_of_one_forward():
    attention = load_bench("attention")
    from sedit.presets import preset

    cfg = preset("XL")
    calls = attention.attention_calls(train_step.stage_config("XL", 1, None, 1))  # 256 px, 75% masked, 128 images
    assert len(calls) == 1 + 2 * cfg.mixer_depth + 2 * cfg.depth  # caption encoder, then self + cross per block
    assert calls[0] == (128, cfg.width // cfg.head_dim, cfg.caption_len, cfg.caption_len)
    assert calls[1] == (128, cfg.mixer_width // cfg.head_dim, 256, 256)  # the mixer sees all 16x16 tokens
    assert calls[2] == (128, cfg.mixer_width // cfg.head_dim, 256, cfg.caption_len)
    assert {c[2] for c in calls[1 + 2 * cfg.mixer_depth :]} == {64}  # the backbone sees the 64 kept ones
    assert calls[-2][1] == cfg.width // cfg.head_dim  # the last block's attention is full width
    stage4 = train_step.stage_config("XL", 4, None, 1)
    assert {c[2] for c in attention.attention_calls(stage4)[1:]} == {1024}  # 512 px unmasked


def test_trace_launchers_ties_kernels_to_the_host_operator_that_launched_them():
    trace_launchers = load_bench("trace_launchers")

    def launch(tid: int, ts: float, correlation: int) -> dict:
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts, "dur": 2,
                "args": {"correlation": correlation}}  # fmt: skip

    events = [
        {"ph": "X", "cat": "cpu_op", "name": "AccumulateGrad", "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "tid": 1, "ts": 10, "dur": 20},
        launch(1, 12, 7),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 2, "ts": 40, "dur": 20},
        launch(2, 45, 8),
        {"ph": "X", "cat": "kernel", "name": "direct_copy_kernel", "ts": 200, "dur": 300, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "direct_copy_kernel", "ts": 600, "dur": 100, "args": {"correlation": 8}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 800, "dur": 900, "args": {"correlation": 8}},
    ]
    rows = trace_launchers.launchers(events, ["direct_copy"])
    assert rows == [
        ("direct_copy_kernel", ("AccumulateGrad", "aten::copy_"), 1, 300),
        ("direct_copy_kernel", ("aten::mm",), 1, 100),
    ]


def test_compiled_stages_refuses_more_stages_than_gpus(tmp_path):
    import os
    import subprocess

    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "compiled_stages.sh"), str(tmp_path / "out"), "1 2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert run.returncode == 2
    assert "2 stages but 0 GPUs" in run.stderr
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing started


def test_inductor_options_set_plain_and_dotted_keys_and_refuse_unknown_ones(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    monkeypatch.setattr(inductor_config.triton, "cudagraph_trees", True)
    monkeypatch.setattr(inductor_config, "max_autotune_gemm_backends", "ATEN")
    parser = argparse.ArgumentParser()
    options = [
        "coordinate_descent_tuning=True",
        "triton.cudagraph_trees=False",
        "max_autotune_gemm_backends=ATEN,TRITON",
    ]
    train_step.apply_inductor_options(options, parser)
    assert inductor_config.coordinate_descent_tuning is True  # parsed as a Python literal
    assert inductor_config.triton.cudagraph_trees is False
    assert inductor_config.max_autotune_gemm_backends == "ATEN,TRITON"  # not a literal: kept as text
    args = setup_args("--compile", "reduce-overhead", "--inductor", options[0], "--sdpa", "cudnn")
    assert train_step.setup_suffix(args) == (
        ", torch.compile reduce-overhead, coordinate_descent_tuning=True, cudnn SDPA only"
    )
    eager = setup_args("--sdpa", "efficient")
    assert train_step.setup_suffix(eager) == ", efficient SDPA only"  # a kernel choice shows without compiling too
    for bad in ("no_such_option=1", "triton.no_such_option=1", "coordinate_descent_tuning"):
        with pytest.raises(SystemExit):
            train_step.apply_inductor_options([bad], parser)


def test_sdpa_restriction_leaves_one_kernel_family():
    switches = torch.backends.cuda
    before = (switches.cudnn_sdp_enabled(), switches.mem_efficient_sdp_enabled(), switches.flash_sdp_enabled())
    try:
        train_step.restrict_sdpa("efficient")
        assert (switches.cudnn_sdp_enabled(), switches.mem_efficient_sdp_enabled(), switches.flash_sdp_enabled()) == (
            False,
            True,
            False,
        )
        train_step.restrict_sdpa(None)  # no choice: nothing changes
        assert not switches.flash_sdp_enabled()
    finally:
        switches.enable_cudnn_sdp(before[0])
        switches.enable_mem_efficient_sdp(before[1])
        switches.enable_flash_sdp(before[2])
