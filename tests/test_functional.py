"""Property tests of peft_gralora.functional against the dense block formula of tests/reference.py.

Everything runs in float64 so that "equal" can mean equal to ~1e-10 and a wrong index cannot hide in a tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_gralora.functional import (
    export_lora_factors,
    gralora_add_delta_,
    gralora_delta_weight,
    gralora_effective_rank,
    gralora_forward,
    gralora_shape,
    init_gralora_A_,
    upstream_to_variant,
    variant_to_upstream,
)
from tests.reference import dense_delta, dense_output, upstream_dense_delta

PROPS = settings(max_examples=40, deadline=None)
TOL = dict(rtol=1e-10, atol=1e-10)


@st.composite
def layouts(draw):
    """(k, s, h, n, m): k blocks per side, sub-block rank s, hybrid rank h, input block width n, output height m."""
    k = draw(st.integers(1, 4))
    return k, draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))


def random_factors(k, s, h, n, m, seed):
    """lora_A.weight (r, in) and lora_B.weight (out, r) with every entry non-zero (B included)."""
    gen = torch.Generator().manual_seed(seed)
    r = k * s + h
    weight_A = torch.randn(r, k * n, generator=gen, dtype=torch.float64)
    weight_B = torch.randn(k * m, r, generator=gen, dtype=torch.float64)
    return weight_A, weight_B


seeds = st.integers(0, 2**16)
lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2)


@PROPS
@given(layout=layouts(), lead=lead_shapes, with_bias=st.booleans(), seed=seeds)
def test_forward_matches_dense_formula(layout, lead, with_bias, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    x = torch.randn(*lead, k * n, dtype=torch.float64)
    bias = torch.randn(k * m, dtype=torch.float64) if with_bias else None
    y = gralora_forward(x, weight_A, weight_B, k, h, bias)
    assert y.shape == (*lead, k * m)
    torch.testing.assert_close(y, dense_output(x, weight_A, weight_B, k, h, bias), **TOL)


@PROPS
@given(layout=layouts(), seed=seeds)
def test_delta_weight_matches_dense_formula(layout, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    torch.testing.assert_close(gralora_delta_weight(weight_A, weight_B, k, h), dense_delta(weight_A, weight_B, k, h))


@PROPS
@given(layout=layouts(), seed=seeds)
def test_delta_weight_differentiable_path_matches_dense_formula(layout, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = (t.requires_grad_() for t in random_factors(*layout, seed))
    delta = gralora_delta_weight(weight_A, weight_B, k, h)
    torch.testing.assert_close(delta, dense_delta(weight_A, weight_B, k, h), **TOL)
    assert delta.requires_grad  # DoRA's weight norm differentiates through it
    # finite differences, independent of how the gradient is formed
    assert torch.autograd.gradcheck(lambda a, b: gralora_delta_weight(a, b, k, h), (weight_A, weight_B))


@PROPS
@given(layout=layouts(), seed=seeds, alpha=st.sampled_from([1.0, -0.5, 3.0]), transposed=st.booleans(),
       overwrite=st.booleans())  # fmt: skip
def test_add_delta_in_place_matches_dense_formula(layout, seed, alpha, transposed, overwrite):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    base = torch.randn(k * m, k * n, dtype=torch.float64)
    target = (base.T if transposed else base).clone()
    if overwrite:
        target.fill_(float("nan"))  # overwrite must never read the old contents
    want = alpha * dense_delta(weight_A, weight_B, k, h) + (0 if overwrite else base)
    out = gralora_add_delta_(target, weight_A, weight_B, k, h, alpha=alpha, transposed=transposed, overwrite=overwrite)
    assert out is target
    torch.testing.assert_close(target.T if transposed else target, want, **TOL)


@pytest.mark.parametrize(
    ("shape", "dtype", "transposed"),
    [((12, 8), torch.float64, False), ((8, 12), torch.float64, True), ((8, 12), torch.float32, False)],
)
def test_add_delta_rejects_wrong_target(shape, dtype, transposed):
    weight_A, weight_B = random_factors(2, 2, 1, 6, 4, 0)  # in 12, out 8
    target = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=r"gralora_add_delta_: target must be"):
        gralora_add_delta_(target, weight_A, weight_B, 2, 1, transposed=transposed)
    assert not target.any()


@PROPS
@given(layout=layouts(), seed=seeds)
def test_export_lora_factors_are_exact(layout, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    a_plain, b_plain = export_lora_factors(weight_A, weight_B, k, h)
    g = k * s
    assert a_plain.shape == (k * g + h, k * n) and b_plain.shape == (k * m, k * g + h)
    torch.testing.assert_close(b_plain @ a_plain, dense_delta(weight_A, weight_B, k, h), **TOL)


@PROPS
@given(layout=layouts(), seed=seeds)
def test_upstream_layout_round_trip(layout, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    up = variant_to_upstream(weight_A, weight_B, k, h)
    assert up[0].shape == (k, n, k * s) and up[1].shape == (k, k * s, m)
    assert (up[2] is None) == (h == 0)
    # the reshape is a pure permutation of entries, so the round trip is bit-exact
    back_A, back_B = upstream_to_variant(*up)
    assert torch.equal(back_A, weight_A) and torch.equal(back_B, weight_B)
    # and upstream's own block formula on the converted weights is our delta
    torch.testing.assert_close(upstream_dense_delta(*up), dense_delta(weight_A, weight_B, k, h), **TOL)


@PROPS
@given(layout=layouts(), seed=seeds)
def test_upstream_to_variant_matches_upstream_formula(layout, seed):
    # the other direction: random upstream weights, converted, must compute upstream's delta
    k, s, h, n, m = layout
    gen = torch.Generator().manual_seed(seed)
    g = k * s
    gralora_A = torch.randn(k, n, g, generator=gen, dtype=torch.float64)
    gralora_B = torch.randn(k, g, m, generator=gen, dtype=torch.float64)
    general = (torch.randn(h, k * n, dtype=torch.float64), torch.randn(k * m, h, dtype=torch.float64)) if h else ()
    weight_A, weight_B = upstream_to_variant(gralora_A, gralora_B, *general)
    assert weight_A.shape == (g + h, k * n) and weight_B.shape == (k * m, g + h)
    expected = upstream_dense_delta(gralora_A, gralora_B, *(general or (None, None)))
    torch.testing.assert_close(dense_delta(weight_A, weight_B, k, h), expected, **TOL)


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix))


@PROPS
@given(layout=layouts(), seed=seeds)
def test_rank_of_delta_is_k_times_g_plus_h(layout, seed):
    k, s, h, n, m = layout
    weight_A, weight_B = random_factors(*layout, seed)
    r, in_f, out_f = k * s + h, k * n, k * m
    expected = min(k * (r - h) + h, in_f, out_f)
    assert gralora_effective_rank(in_f, out_f, r, k, h) == expected
    assert _rank(gralora_delta_weight(weight_A, weight_B, k, h)) == expected
    # plain LoRA with the very same factors (and the same parameter count) stays at rank r
    assert _rank(weight_B @ weight_A) == min(r, in_f, out_f)


def test_rank_gain_is_visible_on_a_square_layer():
    # a concrete case where the difference is large: r=8, k=4, h=0 on 64x64 gives rank 32 vs LoRA's 8
    weight_A, weight_B = random_factors(4, 2, 0, 16, 16, seed=1)
    assert _rank(gralora_delta_weight(weight_A, weight_B, 4, 0)) == 32
    assert _rank(weight_B @ weight_A) == 8


@PROPS
@given(layout=layouts(), out_block=st.integers(0, 3), seed=seeds)
def test_gradient_isolation_between_output_blocks(layout, out_block, seed):
    k, s, h, n, m = layout
    i = out_block % k
    g = k * s
    weight_A, weight_B = (w.requires_grad_() for w in random_factors(*layout, seed))
    x = torch.randn(5, k * n, dtype=torch.float64)
    y = gralora_forward(x, weight_A, weight_B, k, h)
    y[:, i * m : (i + 1) * m].pow(2).sum().backward()

    own_A = torch.zeros(g, dtype=torch.bool)
    own_A[i * s : (i + 1) * s] = True  # rows i*s.. of A are A_i1..A_ik
    own_B = torch.zeros(k * m, dtype=torch.bool)
    own_B[i * m : (i + 1) * m] = True  # rows of output block i hold B_i1..B_ik
    grad_A, grad_B = weight_A.grad[:g], weight_B.grad[:, :g]
    # exactly zero, not merely small: other blocks are never touched by this loss
    assert torch.count_nonzero(grad_A[~own_A]) == 0
    assert torch.count_nonzero(grad_B[~own_B]) == 0
    # and the test is not vacuous: the block's own weights do get gradient
    assert torch.count_nonzero(grad_A[own_A]) == grad_A[own_A].numel()
    assert torch.count_nonzero(grad_B[own_B]) == grad_B[own_B].numel()
    if h:  # the hybrid branch sees every output block
        assert torch.count_nonzero(weight_A.grad[g:]) == h * k * n


@pytest.mark.parametrize(
    "shape_A, shape_B, k, h, match",
    [
        ((4, 8), (8, 4, 1), 2, 0, r"weight_A \(r, in\) and weight_B \(out, r\)"),
        ((4, 8), (8, 3), 2, 0, r"weight_A \(r, in\) and weight_B \(out, r\), got \(4, 8\) and \(8, 3\)"),
        ((4, 8), (8, 4), 0, 0, r"gralora_k=0"),
        ((4, 8), (8, 4), 2, 4, r"hybrid_r=4.*0 <= hybrid_r < r"),
        ((4, 8), (8, 4), 2, -1, r"hybrid_r=-1"),
        ((5, 8), (8, 5), 2, 0, r"r=5, gralora_k=2.*\(r - hybrid_r\) % k == 0"),
        ((4, 6), (8, 4), 4, 0, r"in_features=6.*divisible by k"),
        ((4, 8), (6, 4), 4, 0, r"out_features=6.*divisible by k"),
    ],
)
def test_gralora_shape_rejects_invalid_adapters(shape_A, shape_B, k, h, match):
    with pytest.raises(ValueError, match=match):
        gralora_shape(torch.zeros(shape_A), torch.zeros(shape_B), k, h)


def test_gralora_shape_reports_sizes():
    shp = gralora_shape(torch.zeros(7, 12), torch.zeros(6, 7), k=3, hybrid_r=1)
    assert (shp.r, shp.g, shp.s, shp.n, shp.m) == (7, 6, 2, 4, 2)


def test_upstream_to_variant_rejects_mismatched_B():
    with pytest.raises(ValueError, match=r"gralora_B must have shape \(k=2, g=4, out/k\), got \(2, 3, 5\)"):
        upstream_to_variant(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


def test_init_uses_block_fan_in():
    # 2048 and 128 samples: the largest magnitude of each part must come close to its bound and never exceed it
    k, h, in_f = 4, 2, 64
    weight_A = torch.empty(8 * k + h, in_f)
    init_gralora_A_(weight_A, k, h, generator=torch.Generator().manual_seed(0))
    bound_g, bound_h = 1 / math.sqrt(in_f // k), 1 / math.sqrt(in_f)
    block, hyb = weight_A[: 8 * k].abs().max(), weight_A[8 * k :].abs().max()
    assert 0.95 * bound_g < block <= bound_g
    assert 0.9 * bound_h < hyb <= bound_h
