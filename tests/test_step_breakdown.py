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


def test_union_length_counts_overlaps_once():
    assert step_breakdown.union_length([]) == 0
    assert step_breakdown.union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert step_breakdown.union_length([(3, 4), (0, 10)]) == 10


def test_breakdown_splits_the_window_into_parts_that_add_up():
    events = [
        kernel("gemm", 0, 100),
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


def test_breakdown_refuses_a_trace_without_gpu_activity():
    with pytest.raises(ValueError, match="no GPU activity"):
        step_breakdown.breakdown([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])


def tiny_runner(global_batch: int):
    cfg = train_step.stage_config("tiny", 1, 2, 1, global_batch)
    args = argparse.Namespace(ds=None, compile=False)
    return cfg, train_step.make_step(cfg, args, torch.device("cpu"))


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
        assert layer.last_routing is None  # statistics switched off again
        tokens = row["tokens_per_expert_min"]
        assert tokens == row["tokens_per_expert_max"] > 0  # every expert is exactly full
        assert 0 <= row["dropped_fraction"] < 1
        assert row["importance_max_over_min"] >= 1
        assert 0 < row["router_entropy"] <= torch.log(torch.tensor(float(cfg.model.num_experts))).item() + 1e-6
