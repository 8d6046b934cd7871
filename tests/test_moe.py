import pytest
import torch
import torch.nn.functional as F

from sedit.moe import ExpertChoiceMoE, expert_capacity
from sedit.moe.dispatch import combine, dispatch, place
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


def test_dispatch_and_combine_are_index_moves():
    x = torch.randn(2, 6, 3)
    index = torch.tensor([[[0, 5], [2, 3]], [[1, 2], [4, 1]]])  # (N=2, E=2, C=2)
    placement = place(index, 6)
    assert placement.slot[1, 1].tolist() == [2, 1, 2, 2, 0, 2]  # token 4 in slot 0, token 1 in slot 1, C=2: none
    tokens = dispatch(x, placement)  # (E, N*C, D)
    assert tokens.shape == (2, 4, 3)
    torch.testing.assert_close(tokens[1, 2], x[1, 4])
    gates = torch.ones(2, 2, 2)
    back = combine(tokens, gates, placement)
    torch.testing.assert_close(back[0, 0], x[0, 0])
    torch.testing.assert_close(back[1, 1], 2 * x[1, 1])  # taken by both experts
    assert (back[0, 1] == 0).all()  # nobody took it


def scatter_add_combine(expert_out, gates, index, tokens):
    """The scatter-add form of the combine, for reference: y_t = sum over (e, slot) holding t of gate * out."""
    n, e, c = index.shape
    weighted = expert_out.view(e, n, c, -1).transpose(0, 1) * gates[..., None]  # (N, E, C, D)
    flat = (index + tokens * torch.arange(n)[:, None, None]).reshape(-1)
    out = expert_out.new_zeros(n * tokens, expert_out.shape[-1])
    return out.index_add(0, flat, weighted.reshape(-1, expert_out.shape[-1])).view(n, tokens, -1)


def random_index(n, e, c, tokens):
    """(N, E, C) routing index: every expert takes C distinct tokens of every image."""
    return torch.rand(n, e, tokens).argsort(dim=-1)[..., :c]


def test_combine_gradients_are_exact():
    """The combine's hand-written backward (gathers) against numerical Jacobians; its forward against the
    scatter-add form."""
    torch.manual_seed(0)
    n, e, c, t, d = 3, 5, 4, 10, 6
    placement = place(random_index(n, e, c, t), t)
    out = torch.randn(e, n * c, d, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(n, e, c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda out, gates: combine(out, gates, placement), (out, gates))
    torch.testing.assert_close(
        combine(out, gates, placement), scatter_add_combine(out, gates, placement.token_index, t)
    )


def test_combine_in_bf16_rounds_once():
    """bf16 expert outputs with fp32 gates: products and the sum over experts in fp32, one rounding at the end."""
    torch.manual_seed(0)
    n, e, c, t, d = 4, 8, 16, 64, 32
    placement = place(random_index(n, e, c, t), t)
    out = torch.randn(e, n * c, d).bfloat16()
    gates = torch.rand(n, e, c)
    y = combine(out, gates, placement)
    assert y.dtype == torch.bfloat16
    exact = scatter_add_combine(out.double(), gates.double(), placement.token_index, t)
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-30)


def test_the_moe_forward_adds_nothing_by_scatter():
    """The layer's forward gathers; nothing accumulates through a scatter-add (atomics on the GPU). The
    backward gets the same from the combine; the dispatch's backward is autograd's scatter-add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    layer = make_layer(gated=True).float()
    x = torch.randn(2, 16, 16, requires_grad=True)
    with OpNames() as forward:
        out = layer(x)
    with OpNames() as backward:
        out.backward(torch.randn_like(out))
    assert "aten.gather.default" in forward.names and "aten.bmm.default" in forward.names  # it saw the layer at work
    adds = ("index_add", "scatter_add", "index_put")
    assert not [name for name in forward.names if any(op in name for op in adds)]
    assert [name for name in backward.names if "scatter_add" in name]  # the dispatch's (and only the dispatch's)
    assert not [name for name in backward.names if any(op in name for op in ("index_add", "index_put"))]


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
