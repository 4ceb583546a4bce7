"""The forward's implementations against the dense block formula of tests/reference.py, on any memory layout.

``gralora_forward`` / ``gralora_add_forward`` pick one of: the autograd function (a gradient is needed), the inference
kernel (no gradient; block views built with ``as_strided`` from the operands' own strides, so every layout must be
tried), the hybrid-capable fused forward without autograd, and plain ops (torch.compile, autocast). float64
throughout, so a wrong index cannot hide in a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_gralora import functional
from peft_gralora.functional import gralora_add_forward, gralora_forward
from tests.reference import dense_output

PROPS = settings(max_examples=30, deadline=None)
TOL = dict(rtol=1e-10, atol=1e-10)
MEMORY = ("contiguous", "column-major", "offset", "strided")
PATHS = ("no_grad", "function", "plain")


def in_memory(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t (..., c)`` laid out differently in memory."""
    if how == "contiguous":
        return t.contiguous()
    if how == "column-major":  # leading dims reversed in memory (for 2-D: the transpose's storage)
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    if how == "offset":  # a window inside a bigger tensor: non-zero storage offset, row stride > width
        big = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype)
        big[..., 2 : 2 + t.shape[-1]] = t
        return big[..., 2 : 2 + t.shape[-1]]
    big = torch.full((*t.shape, 2), float("nan"), dtype=t.dtype)  # every element 2 apart
    big[..., 0] = t
    return big[..., 0]


@st.composite
def cases(draw):
    k = draw(st.integers(1, 4))
    s, h, n, m = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    mem = draw(st.tuples(*[st.sampled_from(MEMORY)] * 4))  # x, weight_A, weight_B, result
    return k, s, h, n, m, lead, mem


def _inputs(k, s, h, n, m, lead, mem, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = k * s + h
    x = torch.randn(*lead, k * n, generator=gen, dtype=torch.float64)
    weight_A = torch.randn(r, k * n, generator=gen, dtype=torch.float64)
    weight_B = torch.randn(k * m, r, generator=gen, dtype=torch.float64)
    result = torch.randn(*lead, k * m, generator=gen, dtype=torch.float64)
    laid = [in_memory(t, how) for t, how in zip((x, weight_A, weight_B, result), mem, strict=True)]
    return (x, weight_A, weight_B, result), laid


def _run(path: str, fn, weights, monkeypatch):
    if path == "plain":  # what torch.compile traces and autocast runs
        monkeypatch.setattr(functional.dispatch, "_needs_plain_ops", lambda x: True)
    if path == "function":
        for w in weights:
            w.requires_grad_(True)
        return fn()
    for w in weights:  # generation inside training: the weights require grad, the context does not
        w.requires_grad_(True)
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(case=cases(), with_bias=st.booleans())
def test_every_path_and_layout_matches_dense_formula(path, case, with_bias):
    k, s, h, n, m, lead, mem = case
    (x, weight_A, weight_B, result), (x_l, a_l, b_l, result_l) = _inputs(*case)
    bias = torch.randn(k * m, dtype=torch.float64) if with_bias else None
    expected = dense_output(x, weight_A, weight_B, k, h, bias)
    with pytest.MonkeyPatch.context() as mp:
        y = _run(path, lambda: gralora_forward(x_l, a_l, b_l, k, h, bias), (a_l, b_l), mp)
        added = _run(path, lambda: gralora_add_forward(result_l, x_l, a_l, b_l, k, h, 0.5, bias), (a_l, b_l), mp)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(added, result + 0.5 * expected, **TOL)
    assert y.shape == added.shape == (*lead, k * m)


def _fail(*args, **kwargs):
    raise AssertionError("the autograd function must not run without a gradient")


@pytest.mark.parametrize("h", [0, 2])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
def test_no_autograd_function_without_a_gradient(monkeypatch, h, context):
    (x, weight_A, weight_B, result), _ = _inputs(2, 2, h, 3, 2, [2, 5], ("contiguous",) * 4)
    expected = dense_output(x, weight_A, weight_B, 2, h)
    monkeypatch.setattr(functional._GraloraFunction, "apply", _fail)
    if context == "frozen":  # grad mode on, nothing requires grad (a frozen adapter in a trained model)
        y = gralora_add_forward(result, x, weight_A, weight_B, 2, h, 2.0)
    else:
        weight_A.requires_grad_(True)
        with torch.no_grad() if context == "no_grad" else torch.inference_mode():
            y = gralora_add_forward(result, x, weight_A, weight_B, 2, h, 2.0)
    assert y.grad_fn is None
    torch.testing.assert_close(y, result + 2.0 * expected, **TOL)


def _graph_names(fn) -> set[str]:
    names, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def test_gradient_runs_through_the_autograd_function():
    (x, weight_A, weight_B, result), _ = _inputs(2, 2, 1, 3, 2, [4], ("contiguous",) * 4)
    weight_B.requires_grad_(True)
    y = gralora_forward(x, weight_A, weight_B, 2, 1)
    assert "_GraloraFunctionBackward" in _graph_names(y.grad_fn)
    # the add path too: the result requiring grad alone is enough to need the autograd path
    out = gralora_add_forward(result.requires_grad_(True), x, weight_A.detach(), weight_B.detach(), 2, 1, 1.0)
    out.sum().backward()
    torch.testing.assert_close(result.grad, torch.ones_like(result))


@pytest.mark.parametrize("grad", [False, True])
def test_shape_check_runs_on_every_call(grad):
    """The check is cached per valid shape only: an invalid adapter is refused every time, also after valid calls."""
    x = torch.randn(3, 8)
    weight_A, weight_B = torch.randn(4, 8), torch.randn(8, 4)
    with torch.set_grad_enabled(grad):
        gralora_add_forward(torch.zeros(3, 8), x, weight_A, weight_B, 2, 0, 1.0)
        for _ in range(2):
            with pytest.raises(ValueError, match=r"r=4, gralora_k=3"):
                gralora_add_forward(torch.zeros(3, 8), x, weight_A, weight_B, 3, 0, 1.0)
            with pytest.raises(ValueError, match=r"got \(4, 8\) and \(8, 3\)"):
                gralora_forward(x, weight_A, weight_B[:, :3], 2, 0)


def test_add_forward_falls_back_where_the_fused_add_cannot_apply():
    """A result of another dtype or a broadcast result keep the semantics of ``result + scaling * y``."""
    (x, weight_A, weight_B, _), _ = _inputs(2, 2, 0, 3, 2, [4], ("contiguous",) * 4)
    expected = dense_output(x, weight_A, weight_B, 2, 0)
    with torch.no_grad():
        other_dtype = torch.randn(4, 4, dtype=torch.float32)
        y = gralora_add_forward(other_dtype, x, weight_A, weight_B, 2, 0, 3.0)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, other_dtype.double() + 3.0 * expected, **TOL)
        row = torch.randn(1, 4, dtype=torch.float64)
        torch.testing.assert_close(gralora_add_forward(row, x, weight_A, weight_B, 2, 0, 3.0), row + 3.0 * expected)


@pytest.mark.parametrize("h", [0, 2])
def test_custom_ops_pass_torch_opcheck(h):
    """The ops torch.compile traces: fake (meta) rules match the real outputs, autograd registration is sound."""
    (x, weight_A, weight_B, _), _ = _inputs(2, 2, h, 3, 2, [5], ("contiguous",) * 4)
    g = weight_A.shape[0] - h
    x2, weight_A, weight_B = (t.requires_grad_(True) for t in (x, weight_A, weight_B))
    forward_op, backward_op = functional.register_compile_ops()
    torch.library.opcheck(forward_op, (x2, weight_A, weight_B, 2, g))
    y, u = forward_op(x2, weight_A, weight_B, 2, g)
    torch.testing.assert_close(y, dense_output(x, weight_A, weight_B, 2, h), **TOL)
    grad_y = torch.randn_like(y)
    for needs in ((True, True, True), (False, True, False)):
        args = (grad_y, x2.detach(), weight_A.detach(), weight_B.detach(), u.detach(), 2, g, *needs)
        torch.library.opcheck(backward_op, args)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("x_shape", [(1, 10), (4, 10), (1, 6), (8,), ()])
def test_input_of_the_wrong_width_is_refused(grad, x_shape):
    """The inference kernel reads ``x`` through strides built from ``in_features``: a wrong width must raise, also
    where the element count happens to fit (one token of 10 values for in=8 would otherwise read the first 8)."""
    weight_A, weight_B = torch.randn(4, 8, requires_grad=grad), torch.randn(6, 4)
    x = torch.randn(x_shape)
    if x_shape == (8,):  # the right width: accepted
        assert gralora_forward(x, weight_A, weight_B, 2, 0).shape == (6,)
        return
    with pytest.raises(ValueError, match=r"in_features=8"):
        gralora_forward(x, weight_A, weight_B, 2, 0)
    with pytest.raises(ValueError, match=r"in_features=8"):
        gralora_add_forward(torch.zeros(*x_shape[:-1], 6), x, weight_A, weight_B, 2, 0, 1.0)


def test_result_of_the_wrong_width_is_not_read_through_the_kernel():
    """A ``result`` whose last dim is not ``out_features`` takes the generic path: broadcast where ``result + y``
    broadcasts (a per-row column), an error where it does not; never a strided read of the wrong layout."""
    (x, weight_A, weight_B, _), _ = _inputs(2, 2, 0, 3, 2, [1], ("contiguous",) * 4)
    expected = dense_output(x, weight_A, weight_B, 2, 0)
    with torch.no_grad():
        column = torch.randn(1, 1, dtype=torch.float64)
        torch.testing.assert_close(gralora_add_forward(column, x, weight_A, weight_B, 2, 0, 1.0), column + expected)
        with pytest.raises(RuntimeError):
            gralora_add_forward(torch.zeros(1, 8, dtype=torch.float64), x, weight_A, weight_B, 2, 0, 1.0)


@pytest.mark.parametrize("lead", [(), (1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("mem", MEMORY)
def test_one_token_keeps_the_result_shape_on_every_layout(lead, mem):
    """Decode (one token) on the inference kernel: the fused add returns ``result``'s own shape for any leading dims
    and any memory layout of ``result`` (the kernel reads a non-contiguous result through a 2-D copy)."""
    case = (2, 2, 0, 3, 2, list(lead), ("contiguous", "contiguous", "contiguous", mem))
    (x, weight_A, weight_B, result), (x_l, a_l, b_l, result_l) = _inputs(*case)
    with torch.no_grad():
        added = gralora_add_forward(result_l, x_l, a_l, b_l, 2, 0, 0.5)
    assert added.shape == result.shape == (*lead, 4)
    torch.testing.assert_close(added, result + 0.5 * dense_output(x, weight_A, weight_B, 2, 0), **TOL)


def _within_bf16_rounding(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> bool:
    """Every element within 2 % of ``bound``: the same formula over the operands' absolute values, so the size of the
    terms summed, not of their (possibly cancelling) sum. bf16 rounds each operand and partial result by <= 0.4 %; a
    mixed-up block or a wrong stride is off by a sizeable share of the terms."""
    return bool(((got.double() - expected).abs() <= 2e-2 * bound + 1e-12).all())


@pytest.mark.parametrize("path", ["no_grad", "function"])
@settings(max_examples=20, deadline=None)
@given(case=cases(), n_tok=st.integers(17, 40))
def test_bfloat16_kernels_on_every_layout(path, case, n_tok):
    """bf16 on CPU runs its own orientation of the GEMMs (token rows first, ``functional/orientation.py``), with its
    own strided block views: every layout against the dense formula, output and gradients. More than 16 tokens, so
    that no decode-sized upcast to float32 hides the bf16 kernels."""
    k, s, h, n, m, _, mem = case
    (x, weight_A, weight_B, result), _ = _inputs(k, s, h, n, m, [n_tok], mem)
    x, weight_A, weight_B, result = (t.bfloat16() for t in (x, weight_A, weight_B, result))
    x_l, a_l, b_l, result_l = (in_memory(t, how) for t, how in zip((x, weight_A, weight_B, result), mem, strict=True))
    grad = path == "function"
    ref = [t.double().requires_grad_(grad) for t in (x, weight_A, weight_B)]
    ref_abs = [t.double().abs().requires_grad_(grad) for t in (x, weight_A, weight_B)]
    expected, bound = dense_output(*ref, k, h), dense_output(*ref_abs, k, h)
    if path == "no_grad":
        with torch.no_grad():
            y = gralora_forward(x_l, a_l, b_l, k, h)
            added = gralora_add_forward(result_l, x_l, a_l, b_l, k, h, 0.5)
        assert y.dtype == added.dtype == torch.bfloat16
        added_bound = result.double().abs() + 0.5 * bound
        assert _within_bf16_rounding(added, result.double() + 0.5 * expected, added_bound)
    else:
        leaves = [t.detach().requires_grad_(True) for t in (x_l, a_l, b_l)]
        y = gralora_forward(*leaves, k, h)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        y.backward(grad_y)
        expected.backward(grad_y.double())
        bound.backward(grad_y.double().abs())
        for leaf, ref_leaf, abs_leaf in zip(leaves, ref, ref_abs, strict=True):
            assert leaf.grad.dtype == torch.bfloat16
            assert _within_bf16_rounding(leaf.grad, ref_leaf.grad, abs_leaf.grad)
    assert _within_bf16_rounding(y, expected.detach(), bound.detach())


@pytest.mark.parametrize("n_tok", [1, 24])
def test_half_precision_result_with_float32_adapter(n_tok):
    """A bf16 base with float32 adapters (peft's default ``autocast_adapter_dtype``): the add path takes the fused
    kernel with the result upcast, and returns float32, as LoRA's ``result + lora_B(lora_A(x)) * scaling`` does."""
    (x, weight_A, weight_B, result), _ = _inputs(2, 3, 0, 4, 5, [n_tok], ("contiguous",) * 4)
    x, weight_A, weight_B = (t.float() for t in (x, weight_A, weight_B))
    result = result.bfloat16()
    expected = result.double() + 0.5 * dense_output(x.double(), weight_A.double(), weight_B.double(), 2, 0)
    with torch.no_grad():
        y = gralora_add_forward(result, x, weight_A, weight_B, 2, 0, 0.5)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
