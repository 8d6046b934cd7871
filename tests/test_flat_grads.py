"""sedit.flat_grads: gradients in one flat buffer, reduced once, clipped with one norm."""

import argparse
import json

import dist_workers
import pytest
import torch
from test_step_breakdown import train_step

from sedit import flat_grads
from sedit.flat_engine import weight_decay_groups
from sedit.flat_grads import FlatGradients


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def test_backward_accumulates_into_views_of_one_buffer():
    model, twin = mlp(), mlp()
    grads = FlatGradients(model.parameters())
    assert grads.buffer.numel() == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 5, 6)
    for part in x:
        model(part).square().sum().backward()
    twin(x.flatten(0, 1)).square().sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert grads.bound()
    assert torch.equal(grads.buffer, torch.cat([p.grad.flatten() for p in model.parameters()]))  # in order
    grads.zero_()
    assert all(not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)  # what the optimizer's zero_grad would do: the views are lost
    assert not grads.bound()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping acts / leaves the gradient alone
def test_clip_matches_torch_and_returns_the_norm_as_a_tensor(max_norm):
    model, twin = mlp(), mlp()
    grads = FlatGradients(model.parameters())
    x = torch.randn(4, 6)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    norm = grads.clip_(max_norm)
    ref = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
    assert isinstance(norm, torch.Tensor)
    torch.testing.assert_close(norm, ref)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.linalg.vector_norm(grads.buffer).item() == pytest.approx(min(max_norm, ref.item()), rel=1e-5)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
@pytest.mark.parametrize("fused", [True, False])  # clipping folded into the kernel / a pass of its own
def test_step_clips_steps_and_zeroes_like_clip_grad_norm_then_adamw(monkeypatch, max_norm, fused):
    model, twin = mlp(), mlp()
    grads = FlatGradients(model.parameters())
    explicit_clips = []
    clip = flat_grads.clip_in_place
    monkeypatch.setattr(flat_grads, "clip_in_place", lambda g, c, norm: explicit_clips.append(c) or clip(g, c, norm))
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=0.1, fused=fused)  # two groups, one scale
    reference = torch.optim.AdamW(weight_decay_groups(twin, 0.1), lr=0.1, foreach=False)
    for _ in range(3):
        x = torch.randn(4, 6)
        model(x).square().sum().backward()
        twin(x).square().sum().backward()
        norm = grads.step(opt, max_norm)
        ref = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        reference.step()
        reference.zero_grad()
        torch.testing.assert_close(norm, ref)
        assert not grads.buffer.any() and grads.bound()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # nothing outlives the step
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(explicit_clips) == (0 if fused else 3)  # fused: the factor rides on the kernel's grad_scale


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])  # clipping acts / leaves the gradient alone
@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_on_separate_gradients_is_clip_grad_norm_then_step(fused, max_norm):
    """The single-GPU bench's step: per-parameter gradients (no flat buffer), the same clipping."""
    model, twin = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    reference = torch.optim.AdamW(twin.parameters(), lr=0.1, foreach=False)
    for _ in range(3):
        x = torch.randn(4, 6)
        model(x).square().sum().backward()
        twin(x).square().sum().backward()
        norm = flat_grads.clipped_step(opt, [p.grad for p in model.parameters()], max_norm)
        ref = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        reference.step()
        torch.testing.assert_close(norm, ref)
        assert (ref > max_norm) == (max_norm < 1)  # clipping active only with the small bound
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)  # left clipped, as clip_grad_norm_ leaves them
        opt.zero_grad()
        reference.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipped_step_without_gradients_steps_nothing():
    param = torch.nn.Parameter(torch.ones(3))
    for fused in (True, False):
        opt = torch.optim.AdamW([param], lr=0.1, fused=fused)
        assert flat_grads.clipped_step(opt, [], 1.0).item() == 0.0
        assert torch.equal(param, torch.ones(3))


def test_a_non_finite_gradient_is_skipped_by_the_fused_step():
    model = mlp()
    grads = FlatGradients(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(4, 6)).square().sum().backward()
    grads.step(opt, 1.0)
    after_one = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    model(torch.randn(4, 6)).square().sum().backward()
    grads.buffer[3] = float("nan")
    norm = grads.step(opt, 1.0)
    assert norm.isnan()  # what the trainer's divergence check sees
    for p, before, m in zip(model.parameters(), after_one, moments, strict=True):
        assert torch.equal(p, before) and torch.equal(opt.state[p]["exp_avg"], m)
        assert opt.state[p]["step"].item() == 1


def test_refuses_mixed_dtypes_strided_and_no_parameters():
    model = mlp()
    model[0].half()
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatGradients(model.parameters())
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        FlatGradients([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])
    strided = torch.nn.Parameter(torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(4, 3\)\) is not contiguous"):
        FlatGradients([torch.nn.Parameter(torch.zeros(2)), strided])


def test_a_parameter_listed_twice_gets_one_slice():
    model = mlp()
    params = list(model.parameters())
    grads = FlatGradients(params + params[:1])
    assert grads.buffer.numel() == sum(p.numel() for p in params)
    model(torch.randn(2, 6)).sum().backward()
    assert grads.bound() and torch.equal(grads.buffer, torch.cat([p.grad.flatten() for p in params]))


def test_two_ranks_reduce_to_the_one_process_gradient(tmp_path):
    dist_workers.run_spawn(dist_workers.flat_data_parallel, 2, tmp_path)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["bound"]
        assert r["reference_norm"] > 10 * r["max_norm"]  # the clipping was active
        assert r["norm"] == pytest.approx(r["reference_norm"], rel=1e-4)
        assert r["max_grad"] > 0
        assert r["mismatched"] == []  # every tensor within rtol 1e-4, atol 1e-7 of one process's gradient


@pytest.mark.parametrize("grad_clip", [1e6, 1e-3])  # off: a wrongly scaled gradient shows; on: a missing clip
def test_bench_flat_steps_equal_the_plain_accumulating_steps(monkeypatch, grad_clip):
    """bench/train_step.py --dp in one process: over two optimizer steps of two micro-batches each, the
    optimizer sees the plain set-up's gradients (a gradient not zeroed between steps would double)."""
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):  # the gradients as the optimizer applies them
        divisor = getattr(self, "grad_scale", 1.0)  # the clipping factor the flat step hands a fused kernel
        seen.append([p.grad / divisor for group in self.param_groups for p in group["params"]])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)

    def two_steps(dp: bool) -> tuple[list[torch.Tensor], str]:
        torch.manual_seed(1)
        cfg = train_step.stage_config("tiny", 1, 2, 1, global_batch=4)
        cfg.stage.grad_clip = grad_clip
        parser = argparse.ArgumentParser()
        train_step.add_setup_arguments(parser)
        args = parser.parse_args(["--dp"] if dp else [])
        runner = train_step.make_step(cfg, args, torch.device("cpu"))
        assert runner.accumulation == 2
        runner.step()
        runner.step()
        return [p.detach().clone() for p in runner.model.parameters()], runner.setup

    flat, flat_setup = two_steps(dp=True)
    plain, plain_setup = two_steps(dp=False)
    assert "flat all-reduce" in flat_setup and "flat" not in plain_setup
    assert len(seen) == 4  # flat's two steps, then plain's two
    for flat_step, plain_step in zip(seen[:2], seen[2:], strict=True):
        for a, b in zip(flat_step, plain_step, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(flat, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dp_alone_runs_in_this_process_and_refuses_deepspeed(monkeypatch):
    parser = argparse.ArgumentParser()
    train_step.add_setup_arguments(parser)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    device = train_step.start_device(parser.parse_args(["--dp"]), parser)
    assert device == torch.device("cpu") and not torch.distributed.is_initialized()  # no launcher: no group
    with pytest.raises(SystemExit):
        train_step.start_device(parser.parse_args(["--dp", "--ds", "ds_configs/zero1_ep.json"]), parser)
