"""GraLoRA adapters under torch.func transforms and forward-mode AD.

The user story is per-sample gradients for differentially private fine-tuning (``vmap(grad(loss))`` over
``functional_call``) and Jacobian tools. References: a per-sample autograd loop (ordinary backward, through the fused
autograd function) and the dense block formula of tests/reference.py. GraLoRA + DoRA and a hybrid branch are axes.
float64 throughout, every adapter weight (B included) random and non-zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from peft import get_peft_model
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from peft_gralora.functional import gralora_forward

from .models import TinyMLP, mlp_config
from .reference import dense_delta, dense_output

TOL = dict(rtol=1e-9, atol=1e-10)
# (hybrid_r, use_dora): the pure grid, a hybrid branch, and GraLoRA + DoRA with and without it
CASES = [
    pytest.param(0, False, id="h0"),
    pytest.param(2, False, id="h2"),
    pytest.param(0, True, id="h0-dora"),
    pytest.param(2, True, id="h2-dora"),
]


def _model(hybrid_r: int, use_dora: bool):
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP().double(), mlp_config(r=6, hybrid_r=hybrid_r, use_dora=use_dora))
    with torch.no_grad():  # magnitudes away from their init: m / ||W + s dW|| != 1
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _loop_grads(model, x, target) -> dict[str, torch.Tensor]:
    """Per-sample gradients, one ordinary backward per sample: ``{name: (N, *param.shape)}``."""
    grads = {n: [] for n in _trainable(model)}
    for i in range(x.shape[0]):
        model.zero_grad()
        ((model(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                grads[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def _per_sample_grads(model, x, target) -> dict[str, torch.Tensor]:
    """The torch.func recipe (Opacus' functorch path): ``vmap(grad(loss))`` over ``functional_call``."""

    def loss(params, xi, ti):
        return ((functional_call(model, params, (xi[None],)) - ti[None]) ** 2).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(_trainable(model), x, target)


@pytest.mark.parametrize(("hybrid_r", "use_dora"), CASES)
def test_per_sample_gradients_by_vmap_grad_equal_a_loop(hybrid_r, use_dora):
    model = _model(hybrid_r, use_dora)
    x, target = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    expected = _loop_grads(model, x, target)
    got = _per_sample_grads(model, x, target)
    assert set(got) == set(expected) and any("lora_A" in n for n in got)
    for name in expected:
        assert expected[name].abs().amax() > 0, name  # a zero gradient would pass any comparison
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


@pytest.mark.parametrize(("hybrid_r", "use_dora"), CASES)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_vmap_forward_equals_the_batched_forward(hybrid_r, use_dora, grad_mode):
    model = _model(hybrid_r, use_dora)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    with torch.set_grad_enabled(grad_mode):
        y = vmap(model)(x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(y, expected, **TOL)


def _layer(hybrid_r: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k, s, n, m = 2, 2, 3, 4
    r = k * s + hybrid_r
    weight_A = torch.randn(r, k * n, generator=gen, dtype=torch.float64)
    weight_B = torch.randn(k * m, r, generator=gen, dtype=torch.float64)
    x = torch.randn(5, k * n, generator=gen, dtype=torch.float64)
    return x, weight_A, weight_B, k


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_jvp_and_forward_ad_equal_the_dense_formula(hybrid_r):
    """The adapter is bilinear: its tangent along ``(dx, dA, dB)`` is ``f(dx, A, B) + f(x, dA, B) + f(x, A, dB)``."""
    x, weight_A, weight_B, k = _layer(hybrid_r)
    dx, d_a, d_b = _layer(hybrid_r, seed=1)[:3]
    expected = (
        dense_output(dx, weight_A, weight_B, k, hybrid_r)
        + dense_output(x, d_a, weight_B, k, hybrid_r)
        + dense_output(x, weight_A, d_b, k, hybrid_r)
    )
    fn = lambda x, a, b: gralora_forward(x, a, b, k, hybrid_r)  # noqa: E731
    y, tangent = jvp(fn, (x, weight_A, weight_B), (dx, d_a, d_b))
    torch.testing.assert_close(y, dense_output(x, weight_A, weight_B, k, hybrid_r), **TOL)
    torch.testing.assert_close(tangent, expected, **TOL)
    for requires_grad in (False, True):  # forward AD alone, and beside a backward graph
        with fwAD.dual_level():
            duals = [
                fwAD.make_dual(t.requires_grad_(requires_grad), d)
                for t, d in zip((x, weight_A, weight_B), (dx, d_a, d_b), strict=True)
            ]
            out = fwAD.unpack_dual(fn(*duals))
        torch.testing.assert_close(out.tangent, expected, **TOL)


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_jacobians_equal_the_dense_delta(hybrid_r):
    """``d y / d x`` of one token is ``delta W``, by reverse and by forward mode."""
    x, weight_A, weight_B, k = _layer(hybrid_r)
    fn = lambda xi: gralora_forward(xi, weight_A, weight_B, k, hybrid_r)  # noqa: E731
    expected = dense_delta(weight_A, weight_B, k, hybrid_r)
    torch.testing.assert_close(jacrev(fn)(x[0]), expected, **TOL)
    torch.testing.assert_close(jacfwd(fn)(x[0]), expected, **TOL)
    jac_a = jacrev(lambda a: gralora_forward(x, a, weight_B, k, hybrid_r))(weight_A)  # (N, out, r, in)
    torch.testing.assert_close(
        torch.einsum("nork,rk->no", jac_a, weight_A), dense_output(x, weight_A, weight_B, k, hybrid_r), **TOL
    )


@pytest.mark.parametrize(("hybrid_r", "use_dora"), CASES)
def test_dp_sgd_step_with_opacus_clips_the_per_sample_gradients_of_a_loop(hybrid_r, use_dora):
    """One DP-SGD step by Opacus' ``DPOptimizer`` (noise 0, so the step is checkable) over per-sample gradients from
    ``vmap(grad)``: equal to the clipped mean of a per-sample autograd loop.

    Opacus' module-hook ``GradSampleModule`` captures each trainable leaf's input when the leaf is called; GraLoRA
    reads ``lora_A`` / ``lora_B`` weights blockwise without calling them, so that path sees no activations for them
    (and Opacus' optimizer refuses the step): per-sample gradients come from torch.func, as here.
    """
    opacus = pytest.importorskip("opacus")
    model = _model(hybrid_r, use_dora)
    x, target = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    loop = _loop_grads(model, x, target)
    names = list(loop)
    norms = torch.stack([loop[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)  # (N,)
    max_norm = float(norms.median())  # half the samples are clipped
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    lr = 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(params, lr=lr), noise_multiplier=0.0, max_grad_norm=max_norm, expected_batch_size=6
    )
    per_sample = _per_sample_grads(model, x, target)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad_sample = per_sample[n]
    optimizer.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            step = torch.einsum("i,i...->...", clip, loop[n]) / 6
            torch.testing.assert_close(p.detach(), before[n] - lr * step, **TOL, msg=n)
