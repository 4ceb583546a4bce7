"""torch.compile: GraLoRA models trace into one graph (``fullgraph=True``) and compute what eager mode computes.

Graphs are counted with dynamo's counting backend; numerics use ``aot_eager`` for training (AOT autograd builds the
backward as inductor would) and ``eager`` for inference, which is cheap on CPU; one small test runs inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend

from tests.models import TinyMLP, tiny_llama
from tests.reference import dense_output

KINDS = {
    "gralora": dict(use_gralora=True, gralora_k=2),
    "hybrid": dict(use_gralora=True, gralora_k=2, hybrid_r=4),
    "gralora+dora": dict(use_gralora=True, gralora_k=2, use_dora=True),
    "hybrid+bias": dict(use_gralora=True, gralora_k=2, hybrid_r=4, lora_bias=True),
}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _llama(kind: str, **config):
    model = tiny_llama(num_hidden_layers=1)
    cfg = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, **KINDS[kind], **config)
    model = get_peft_model(model, cfg)
    with torch.no_grad():  # DoRA's magnitude away from its init value, so the rescaling is not the identity
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return model


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_compiles_fullgraph_and_matches_eager(kind):
    model = _llama(kind).train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    eager = model(input_ids=ids, labels=ids)
    eager.loss.backward()
    eager_grads = _trainable_grads(model)
    model.zero_grad(set_to_none=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(out.logits, eager.logits, **TOL)
    grads = _trainable_grads(model)
    assert grads.keys() == eager_grads.keys() and any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, eager_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_compiles_fullgraph_and_matches_eager(kind):
    model = _llama(kind).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        with model.disable_adapter():  # the adapter changes the output: comparing against eager is not vacuous
            assert not torch.allclose(model(input_ids=ids).logits, eager, **TOL)
        counter = CompileCounterWithBackend("eager")
        out = torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids).logits
    assert counter.frame_count == 1
    torch.testing.assert_close(out, eager, **TOL)


def _mixed_batch_graphs(extra: dict) -> int:
    torch._dynamo.reset()
    model = get_peft_model(tiny_llama(num_hidden_layers=1), LoraConfig(r=8, init_lora_weights=False, **extra))
    model.add_adapter("other", LoraConfig(r=8, init_lora_weights=False, **extra))
    model.eval()
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        eager = model(input_ids=ids, adapter_names=names).logits
        counter = CompileCounterWithBackend("eager")
        out = torch.compile(model, backend=counter)(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(out, eager, **TOL)
    assert not torch.allclose(eager[0], eager[1])  # the rows did use different adapters
    return counter.frame_count


def test_mixed_batch_compiles_as_lora_does():
    """``adapter_names`` batches: peft's own forward hooks keep LoRA from ``fullgraph=True`` there; GraLoRA makes
    exactly as many graphs as LoRA, and equals eager mode."""
    assert _mixed_batch_graphs(KINDS["gralora"]) == _mixed_batch_graphs({})


@pytest.mark.slow  # inductor compiles C++ on CPU: ~20 s
def test_inductor_compiles_gralora_training():
    model = get_peft_model(
        TinyMLP(),
        LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, use_gralora=True, gralora_k=2),
    )
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend="inductor", fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, **TOL)
    for name, grad in _trainable_grads(model).items():
        torch.testing.assert_close(grad, eager_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("registered", [True, False])
def test_functional_forward_compiles_with_or_without_the_custom_ops(monkeypatch, registered):
    """``gralora_forward`` compiled on its own: through the custom op once registered, through plain ops before."""
    from peft_gralora import functional

    ops = functional.register_compile_ops()
    monkeypatch.setattr(functional.dispatch, "COMPILE_OPS", ops if registered else [])
    gen = torch.Generator().manual_seed(4)
    x, weight_A, weight_B = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen), torch.randn(4, 6)
    weight_A.requires_grad_(True)
    counter = CompileCounterWithBackend("aot_eager")
    y = torch.compile(functional.gralora_forward, backend=counter, fullgraph=True)(x, weight_A, weight_B, 2, 2)
    y.sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(y.double(), dense_output(x, weight_A, weight_B, 2, 2), **TOL)
    expected = torch.func.grad(lambda a: dense_output(x, a, weight_B, 2, 2).sum())(weight_A.detach().double())
    torch.testing.assert_close(weight_A.grad.double(), expected, **TOL)


@pytest.mark.parametrize("mode", ["custom op", "plain ops", "autocast"])
@pytest.mark.parametrize("h", [0, 2])
def test_compiled_add_forward_matches_the_block_formula(monkeypatch, mode, h):
    """``gralora_add_forward`` as dynamo traces it (bias, hybrid, autocast) against the dense formula, with
    gradients for every operand; an invalid adapter is refused while tracing, as in eager mode."""
    from peft_gralora import functional

    ops = functional.register_compile_ops()
    monkeypatch.setattr(functional.dispatch, "COMPILE_OPS", [] if mode == "plain ops" else ops)
    gen = torch.Generator().manual_seed(5)
    x, result = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 4, generator=gen)
    weight_A, weight_B = torch.randn(4 + h, 8, generator=gen), torch.randn(4, 4 + h, generator=gen)
    bias = torch.randn(4, generator=gen)
    leaves = [t.requires_grad_(True) for t in (x, result, weight_A, weight_B, bias)]

    def add(x, result, weight_A, weight_B, bias, k=2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            return functional.gralora_add_forward(result, x, weight_A, weight_B, k, h, 0.5, bias)

    counter = CompileCounterWithBackend("aot_eager")
    y = torch.compile(add, backend=counter, fullgraph=True)(*leaves)
    assert counter.frame_count == 1
    tol = dict(rtol=2e-2, atol=5e-2) if mode == "autocast" else TOL
    expected = result.double() + 0.5 * dense_output(x, weight_A, weight_B, 2, h, bias)
    torch.testing.assert_close(y.double(), expected, **tol)
    y.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    add(*leaves).sum().backward()  # eager mode: autograd function, or plain ops under autocast
    for grad, t in zip(grads, leaves, strict=True):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, t.grad, **tol)
    for fullgraph in (False, True):  # dynamo reports a raise in traced code as unsupported under fullgraph
        torch._dynamo.reset()
        with pytest.raises(ValueError if not fullgraph else Exception, match=r"gralora_k=3"):
            torch.compile(add, backend="aot_eager", fullgraph=fullgraph)(*leaves, k=3)
