"""The eight checks of the GraLoRA fork's demo, as real tests against independent references.

Run ``pytest test_gralora_comprehensive.py`` or ``python test_gralora_comprehensive.py`` (one line per check, exit
status 1 on any failure). Every adapter has random, non-zero B, so no check can pass with an adapter that does nothing;
every expected value comes from the dense block formula of ``tests/reference.py`` or from a formula written here,
never from ``peft_gralora`` itself.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import traceback

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from tests.reference import block, dense_delta, dense_output

IN, OUT = 64, 48  # divisible by k = 1, 2, 4, 8


class Net(nn.Module):
    """One adapted projection and one more, so that shapes differ per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)
        self.head = nn.Linear(OUT, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def gralora(r: int = 8, k: int = 4, hybrid_r: int = 0, init: bool | str = False, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["proj", "head"],
        use_gralora=True,
        gralora_k=k,
        hybrid_r=hybrid_r,
        init_lora_weights=init,
        **kwargs,
    )


def make(config: LoraConfig, seed: int = 0):
    """(base copy, peft model): the copy keeps the untouched base weights for the references."""
    torch.manual_seed(seed)
    base = Net()
    return copy.deepcopy(base), get_peft_model(base, config)


def factors(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def scaling(config: LoraConfig) -> float:
    return config.lora_alpha / config.r


def rank(matrix: torch.Tensor) -> int:
    # in float32, so the default tolerance (eps * max(shape) * largest singular value) covers float32 rounding
    return int(torch.linalg.matrix_rank(matrix.detach().float()).item())


# ---------------------------------------------------------------------------------------------------------------------


def test_1_parameter_shapes_and_init():
    """lora_A (r, in), lora_B (out, r), nothing else; A_ij kaiming with block fan-in in/k, A_h fan-in in, B = 0."""
    r, k, h = 12, 4, 4
    _, model = make(gralora(r=r, k=k, hybrid_r=h, init=True))
    proj = model.base_model.model.proj
    A, B = factors(proj)
    assert A.shape == (r, IN) and B.shape == (OUT, r)
    assert (proj.gralora_k["default"], proj.hybrid_r["default"]) == (k, h)
    adapter_params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_params == {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("proj", "head") for ab in ("A", "B")
    }, "no parameters besides LoRA's own may exist"
    assert torch.count_nonzero(B) == 0, "B starts at zero: the adapter is a no-op before training"
    g = r - h
    bound_block, bound_full = 1 / math.sqrt(IN // k), 1 / math.sqrt(IN)
    # block rows use the larger bound of fan-in in/k (upstream's init); an A drawn with fan-in `in` would stay below
    assert A[:g].abs().max() <= bound_block and A[:g].abs().max() > bound_full
    assert A[g:].abs().max() <= bound_full


def test_2_block_structure():
    """delta W is a k x k grid of rank-s blocks B_ij A_ij; its rank is k g + h where LoRA's is r."""
    r, k = 8, 4
    s = r // k
    cfg = gralora(r=r, k=k)
    _, model = make(cfg)
    proj = model.base_model.model.proj
    delta = proj.get_delta_weight("default").double()
    A, B = factors(proj)
    torch.testing.assert_close(delta, scaling(cfg) * dense_delta(A, B, k, 0), atol=1e-6, rtol=1e-5)
    m, n = OUT // k, IN // k
    for i in range(k):
        for j in range(k):
            # the (i, j) block of delta W is B_ij A_ij alone (tests/reference.py), of rank s
            delta_ij = delta[i * m : (i + 1) * m, j * n : (j + 1) * n]
            torch.testing.assert_close(delta_ij, scaling(cfg) * block(A, B, k, 0, i, j), atol=1e-6, rtol=1e-5)
            assert rank(delta_ij) == s
    assert rank(delta) == min(k * r, IN, OUT) == 32
    _, lora_model = make(LoraConfig(r=r, target_modules=["proj"], init_lora_weights=False))
    assert rank(lora_model.base_model.model.proj.get_delta_weight("default")) == r


def test_3_forward_with_information_exchange():
    """Output block i sees every input block j (a dense k x k grid, not block-diagonal), and equals the reference."""
    k = 4
    cfg = gralora(r=8, k=k)
    base, model = make(cfg)
    proj = model.base_model.model.proj
    x = torch.randn(2, 5, IN)  # any number of leading dims
    with torch.no_grad():
        y = proj(x)
    expected = base.proj(x).double() + scaling(cfg) * dense_output(x, *factors(proj), k, 0)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    m, n = OUT // k, IN // k
    for j in range(k):
        bump = torch.zeros(IN)
        bump[j * n : (j + 1) * n] = 1.0
        with torch.no_grad():
            change = proj(x + bump) - y
        for i in range(k):
            assert change[..., i * m : (i + 1) * m].abs().max() > 1e-3, f"input block {j} never reaches output {i}"


def test_4_pure_vs_hybrid():
    """Same r, same parameters; hybrid = GraLoRA part of rank g + a plain LoRA branch of rank h over all blocks."""
    r, k, h = 8, 2, 4
    g = r - h
    pure_cfg, hybrid_cfg = gralora(r=r, k=k), gralora(r=r, k=k, hybrid_r=h)
    _, pure = make(pure_cfg)
    _, hybrid = make(hybrid_cfg)
    count = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    assert count(pure) == count(hybrid)
    proj = hybrid.base_model.model.proj
    A, B = factors(proj)
    delta = proj.get_delta_weight("default").double()
    torch.testing.assert_close(delta, scaling(hybrid_cfg) * dense_delta(A, B, k, h), atol=1e-6, rtol=1e-5)
    # split by hand: the hybrid branch is the last h rows of A / columns of B, a dense (out, in) product
    block_part = dense_delta(A[:g], B[:, :g], k, 0)
    hybrid_part = (B[:, g:] @ A[g:]).double().detach()
    torch.testing.assert_close(delta, scaling(hybrid_cfg) * (block_part + hybrid_part), atol=1e-6, rtol=1e-5)
    assert rank(delta) == k * g + h == 12
    pure_delta = pure.base_model.model.proj.get_delta_weight("default")
    assert rank(pure_delta) == k * r == 16


def test_5_merge_unmerge():
    """merge adds exactly the dense block formula; forward is unchanged by merging; unmerge restores the weight."""
    cfg = gralora(r=12, k=4, hybrid_r=4)
    base, model = make(cfg)
    x = torch.randn(7, IN)
    with torch.no_grad():
        unmerged = model(x)
    proj = model.base_model.model.proj
    expected_weight = base.proj.weight.double() + scaling(cfg) * dense_delta(*factors(proj), 4, 4)
    for safe in (False, True):
        model.merge_adapter(safe_merge=safe)
        torch.testing.assert_close(proj.base_layer.weight.double(), expected_weight, atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(proj.base_layer.weight, base.proj.weight, atol=1e-6, rtol=1e-6)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)
        assert (unmerged - base(x)).abs().max() > 1e-2


def test_6_save_load():
    """save_pretrained / from_pretrained restores the three fields and every weight bit for bit."""
    base, model = make(gralora(r=8, k=2, hybrid_r=2))
    x = torch.randn(3, IN)
    with torch.no_grad():
        expected = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp)
    cfg = loaded.peft_config["default"]
    assert (cfg.use_gralora, cfg.gralora_k, cfg.hybrid_r, cfg.r) == (True, 2, 2, 8)
    saved_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded_state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert saved_state.keys() == loaded_state.keys() and len(saved_state) == 4
    assert all(torch.equal(loaded_state[key], value) for key, value in saved_state.items())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_7_training_gradients():
    """Gradients equal the block formula's, reach only the adapter, stay within their output block; loss falls."""
    r, k = 8, 4
    s, m = r // k, OUT // k
    cfg = gralora(r=r, k=k)
    _, model = make(cfg)
    proj = model.base_model.model.proj
    x = torch.randn(6, IN)
    seed = torch.randn(6, OUT)
    (proj(x) * seed).sum().backward()
    # the same loss through the dense block formula, differentiated by autograd in float64
    A, B = (w.detach().double().requires_grad_() for w in factors(proj))
    (scaling(cfg) * dense_output(x, A, B, k, 0) * seed.double()).sum().backward()
    torch.testing.assert_close(proj.lora_A["default"].weight.grad.double(), A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.lora_B["default"].weight.grad.double(), B.grad, atol=1e-5, rtol=1e-5)
    assert proj.base_layer.weight.grad is None and proj.base_layer.bias.grad is None
    model.zero_grad()

    # a loss on output block 1 only: B rows and A rows of the other output blocks get exactly zero gradient
    proj(x)[:, m : 2 * m].pow(2).sum().backward()
    grad_A, grad_B = proj.lora_A["default"].weight.grad, proj.lora_B["default"].weight.grad
    assert torch.count_nonzero(grad_B[m : 2 * m]) > 0 and torch.count_nonzero(grad_A[s : 2 * s]) > 0
    assert torch.count_nonzero(grad_B[:m]) == 0 and torch.count_nonzero(grad_B[2 * m :]) == 0
    assert torch.count_nonzero(grad_A[:s]) == 0 and torch.count_nonzero(grad_A[2 * s :]) == 0
    model.zero_grad()

    # a few optimizer steps: the loss falls, and the trained adapter still merges to what it computes
    target = torch.randn(6, 16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), trained, atol=1e-5, rtol=1e-5)


def test_8_parameter_efficiency():
    """Exactly LoRA's trainable count at the same r (r (in + out) per layer) for every k / hybrid_r; k x the rank."""
    count = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    r = 8
    _, lora = make(LoraConfig(r=r, target_modules=["proj", "head"]))
    expected = r * (IN + OUT) + r * (OUT + 16)
    assert count(lora) == expected
    for k, h in [(1, 0), (2, 0), (4, 0), (8, 0), (2, 2), (4, 4)]:
        _, model = make(gralora(r=r, k=k, hybrid_r=h))
        assert count(model) == expected, (k, h)
        delta = model.base_model.model.proj.get_delta_weight("default")
        assert rank(delta) == min(k * (r - h) + h, IN, OUT), (k, h)


CHECKS = [
    ("Parameter creation and shapes", test_1_parameter_shapes_and_init),
    ("Block structure", test_2_block_structure),
    ("Forward pass with information exchange", test_3_forward_with_information_exchange),
    ("Pure vs hybrid mode", test_4_pure_vs_hybrid),
    ("Merge/unmerge", test_5_merge_unmerge),
    ("Save/load", test_6_save_load),
    ("Training (gradients)", test_7_training_gradients),
    ("Parameter efficiency", test_8_parameter_efficiency),
]


def main() -> int:
    failed = 0
    for number, (title, check) in enumerate(CHECKS, start=1):
        try:
            check()
        except Exception as exc:  # report every check, not just the first failure
            failed += 1
            # a bare `assert` has no message: name the failing line instead
            where = traceback.extract_tb(exc.__traceback__)[-1]
            detail = str(exc).splitlines()[0] if str(exc) else f"line {where.lineno}: {where.line}"
            print(f"FAIL Test {number}: {title}: {type(exc).__name__}: {detail}")
        else:
            print(f"ok   Test {number}: {title}")
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
