import pytest
import torch
import torch.nn.functional as F

from sedit.moe import ExpertChoiceMoE, expert_capacity
from sedit.moe.dispatch import combine, dispatch
from sedit.moe.routing import Routing, routing_stats


def make_layer(gated=False, seed=0, dim=16, hidden=24, experts=4, capacity=2.0):
    torch.manual_seed(seed)
    layer = ExpertChoiceMoE(dim, hidden, experts, capacity, gated).double()
    torch.nn.init.normal_(layer.router.weight.weight, std=1.0)
    return layer


def naive_expert_choice(layer: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: loop over images and experts, no batching tricks."""
    n, t, d = x.shape
    e = layer.num_experts
    c = expert_capacity(t, e, layer.capacity)
    out = torch.zeros_like(x)
    ex = layer.experts
    for i in range(n):
        probs = F.softmax(x[i] @ layer.router.weight.weight.T, dim=-1)  # (T, E)
        for j in range(e):
            top = torch.topk(probs[:, j], c).indices
            h = x[i, top] @ ex.w1[j].T
            if ex.gated:
                h = F.silu(h) * (x[i, top] @ ex.w3[j].T)
            else:
                h = F.gelu(h, approximate="tanh")
            out[i, top] += probs[top, j, None] * (h @ ex.w2[j].T)
    return out


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tokens", [16, 12])
def test_matches_naive_loop(gated, tokens):
    layer = make_layer(gated)
    x = torch.randn(3, tokens, 16, dtype=torch.float64)
    ref = naive_expert_choice(layer, x)
    out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_matches_naive_loop_fp32_with_gradients():
    layer = make_layer().float()
    x = torch.randn(2, 16, 16, requires_grad=True)
    out = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive_expert_choice(layer, x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, x, g)
    (gb,) = torch.autograd.grad(ref, x2, g)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_every_expert_takes_exactly_capacity_tokens_per_image():
    layer = make_layer(experts=4, capacity=2.0)
    x = torch.randn(5, 32, 16, dtype=torch.float64)
    routing = layer.router(x)
    c = expert_capacity(32, 4, 2.0)
    assert c == 16 and routing.token_index.shape == (5, 4, 16)
    for n in range(5):
        for e in range(4):
            assert len(set(routing.token_index[n, e].tolist())) == c  # C distinct tokens of image n
    stats = routing_stats(routing)
    assert stats["experts_per_token"].item() == pytest.approx(2.0)
    assert 0 <= stats["dropped_fraction"].item() < 1
    assert 0 < stats["router_entropy"].item() <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_routing_of_one_image_ignores_the_rest_of_the_batch():
    layer = make_layer()
    x = torch.randn(4, 16, 16, dtype=torch.float64)
    alone = layer(x[1:2])
    other = x.clone()
    other[0] = torch.randn(16, 16, dtype=torch.float64) * 5
    other[2:] = 0
    together = layer(other)
    torch.testing.assert_close(together[1:2], alone)
    assert torch.equal(layer.router(x).token_index[1], layer.router(x[1:2]).token_index[0])


def test_dispatch_combine_are_index_moves():
    x = torch.randn(2, 6, 3)
    index = torch.tensor([[[0, 5], [2, 3]], [[1, 2], [4, 1]]])  # (N=2, E=2, C=2)
    tokens = dispatch(x, index)  # (E, N*C, D)
    assert tokens.shape == (2, 4, 3)
    torch.testing.assert_close(tokens[1, 2], x[1, 4])
    gates = torch.ones(2, 2, 2)
    back = combine(tokens, gates, index, 6)
    torch.testing.assert_close(back[0, 0], x[0, 0])
    torch.testing.assert_close(back[1, 1], 2 * x[1, 1])  # taken by both experts
    assert (back[0, 1] == 0).all()  # nobody took it


def test_importance_spread_over_experts():
    n, t, e = 2, 8, 4
    index = torch.arange(t).view(1, 1, t).expand(n, e, t)[..., :4]  # (N, E, C): every expert takes tokens 0..3
    uniform = Routing(torch.ones(n, e, 4), index, torch.full((n, t, e), 1 / e))
    one_expert = Routing(torch.ones(n, e, 4), index, F.one_hot(torch.zeros(n, t, dtype=torch.long), e).float())
    assert routing_stats(uniform)["importance_cv"].item() == pytest.approx(0.0)
    assert routing_stats(one_expert)["importance_cv"].item() == pytest.approx((e - 1) ** 0.5)
    assert routing_stats(uniform)["dropped_fraction"].item() == pytest.approx(0.5)
    assert routing_stats(uniform)["tokens_per_expert"].item() == n * 4


@pytest.mark.parametrize("gated", [True, False])
def test_expert_gradients_come_out_in_their_operands_layout(gated):
    """The gradients of the stacked expert weights and of the expert-major tokens are contiguous:
    accumulating into .grad needs no strided copy, and the dispatch's backward reads rows, not
    columns (~5 and ~12 ms per XL stage-1 step otherwise)."""
    from sedit.moe.experts import GroupedExperts

    experts = GroupedExperts(4, 16, 24, gated)
    x = torch.randn(4, 10, 16, requires_grad=True)
    out = experts(x)
    weights = list(experts.parameters())
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, *weights])
    for weight, grad in zip(weights, grads[1:], strict=True):
        assert grad.shape == weight.shape and grad.is_contiguous()
    assert grads[0].shape == x.shape and grads[0].is_contiguous()
    torch.testing.assert_close(grads, torch.autograd.grad((plain_mlp(x, experts) * cotangent).sum(), [x, *weights]))
    torch.testing.assert_close(out, plain_mlp(x, experts))  # and the products are still the per-expert MLPs


def test_expert_mlp_under_autocast_takes_fp32_tokens_and_weights():
    """Autocast runs the matmuls in bf16; fp32 tokens and weights still get gradients of their own dtype."""
    from sedit.moe.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(2, 16, 24, gated=True)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x)
        reference = plain_mlp(x, experts)
    assert out.dtype == torch.bfloat16
    weights = list(experts.parameters())
    grads = torch.autograd.grad(out.float().sum(), [x, *weights])
    expected = torch.autograd.grad(reference.float().sum(), [x, *weights])
    for grad, want, tensor in zip(grads, expected, [x, *weights], strict=True):
        assert grad.dtype == torch.float32 == tensor.dtype
        torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-2)


def plain_mlp(x: torch.Tensor, experts) -> torch.Tensor:
    """Each expert's MLP on its own tokens, with autograd's own matmul backward."""
    outs = []
    for e in range(x.shape[0]):
        h = x[e] @ experts.w1[e].T
        h = F.silu(h) * (x[e] @ experts.w3[e].T) if experts.gated else F.gelu(h, approximate="tanh")
        outs.append(h @ experts.w2[e].T)
    return torch.stack(outs)
