"""Rank set-up: each rank binds its own GPU before the process group makes its first collective."""

from __future__ import annotations

import deepspeed
import torch

from sedit import distributed


def test_start_binds_the_ranks_gpu_before_joining_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("init", dist_backend)))

    assert distributed.start() == torch.device("cuda", 1)
    # A rank that joins first and binds later sends its first all_gather_object from cuda:0 (seen on 2 GPUs).
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_start_on_a_cpu_joins_with_gloo_and_binds_nothing(monkeypatch):
    calls = []
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("init", dist_backend)))

    assert distributed.start() == torch.device("cpu")
    assert calls == [("init", "gloo")]
