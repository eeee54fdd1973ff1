"""One API style for the public ops and one vocabulary for the fused switches.

Every function in ``fastbert.ops.__all__`` takes its tensors positionally (optional tensors default to
None) and its options keyword-only; the dropout ops drop by default (``training=True``, as
``F.dropout``); ``linear_cross_entropy`` without a bias is the loss with a zero bias; ``fastbert.patch``'s
options, its report and ``BertConfig.fused`` use the same switch names."""

import inspect
import math

import pytest
import torch

from fastbert import ops
from fastbert.models.config import FUSABLE, BertConfig
from tests.utils import backend_params, use_backend

BACKENDS = backend_params("cpu")


def test_options_are_keyword_only():
    """Parameters with a default other than None (options) are keyword-only in every public op."""
    for name in ops.__all__:
        fn = getattr(ops, name)
        if inspect.isclass(fn):  # Packing: a result, not an op
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind == p.POSITIONAL_OR_KEYWORD:
                assert p.default in (p.empty, None), f"{name}: option {p.name} may be passed positionally"


def test_options_passed_positionally_raise_type_error():
    x, w = torch.randn(4, 8), torch.randn(8)
    q = torch.randn(5, 2, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    rows, weight, targets = torch.randn(3, 8), torch.randn(6, 8), torch.tensor([1, 2, -100])
    calls = {
        "bias_gelu": lambda: ops.bias_gelu(x, w, "tanh"),
        "layernorm_residual": lambda: ops.layernorm_residual(x, x, w, w, None, 1e-5),
        "masked_softmax": lambda: ops.masked_softmax(torch.randn(1, 2, 3, 4), None, 0.5),
        "gather_masked": lambda: ops.gather_masked(x, torch.tensor([1, -100, 2, 0]), 0),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(rows, weight, targets, None, -100),
        "varlen_attention": lambda: ops.varlen_attention(q, q, q, cu, 3, 0.5),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="positional argument"):
            call()
    # the same calls with keywords run
    ops.bias_gelu(x, w, approximate="tanh")
    ops.layernorm_residual(x, x, w, w, None, eps=1e-5)
    ops.masked_softmax(torch.randn(1, 2, 3, 4), None, scale=0.5)
    ops.gather_masked(x, torch.tensor([1, -100, 2, 0]), ignore_index=0)
    ops.linear_cross_entropy(rows, weight, targets, None, ignore_index=-100)
    ops.varlen_attention(q, q, q, cu, 3, scale=0.5)


def _seeded(seed, fn, **options):
    torch.manual_seed(seed)
    return fn(**options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layernorm_residual", "masked_softmax", "varlen_attention"])
def test_dropout_is_on_by_default(backend, op, seed):
    """``dropout_p > 0`` drops unless ``training=False``: the default is ``training=True``'s output for the
    same seed, and differs from ``training=False`` (which is the ``dropout_p=0`` output)."""
    g = torch.Generator().manual_seed(seed)
    if op == "layernorm_residual":
        x, r = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
        w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)

        def run(**o):
            return ops.layernorm_residual(x, r, w, b, **o)
    elif op == "masked_softmax":
        scores = torch.zeros(2, 3, 4, 64)  # uniform probabilities 1/64: dropout keeps 2/64 or drops to 0

        def run(**o):
            return ops.masked_softmax(scores, **o)
    else:
        q, k, v = (torch.randn(20, 2, 8, generator=g) for _ in range(3))
        cu = torch.tensor([0, 7, 20], dtype=torch.int32)

        def run(**o):
            return ops.varlen_attention(q, k, v, cu, 13, **o)

    with use_backend(backend):
        default = _seeded(1, run, dropout_p=0.5)
        assert torch.equal(default, _seeded(1, run, dropout_p=0.5, training=True))
        evaluated = _seeded(1, run, dropout_p=0.5, training=False)
        assert not torch.equal(default, evaluated)
        assert torch.equal(evaluated, _seeded(1, run, dropout_p=0.0))
    if op == "masked_softmax":  # the dropped probabilities are 0, the kept ones scaled by 1 / (1 - p)
        kept = default != 0
        assert 0 < kept.float().mean() < 1
        torch.testing.assert_close(default[kept], torch.full_like(default[kept], 2 / 64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_without_bias_is_a_zero_bias(backend, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    rows, weight = torch.randn(9, 16, generator=g), torch.randn(30, 16, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)
    targets[3] = -100
    dy = torch.randn(9, generator=g) if reduction == "none" else torch.tensor(1.5)
    results = []
    for bias in (None, torch.zeros(30, requires_grad=True)):
        r, w = rows.clone().requires_grad_(), weight.clone().requires_grad_()
        with use_backend(backend):
            loss = ops.linear_cross_entropy(r, w, targets, bias, reduction=reduction, chunk_size=4)
        loss.backward(dy)
        results.append((loss.detach(), r.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert math.isfinite(results[0][0].sum().item())


def test_one_vocabulary_for_the_fused_switches():
    transformers = pytest.importorskip("transformers")
    from fastbert.patch import OPTIONS, patch, patch_transformers

    assert OPTIONS == FUSABLE + ("unpad",)  # "unpad": BertConfig's own field of that name
    assert FUSABLE == ("bias_gelu", "layernorm_residual", "attention", "mlm_loss")
    keywords = [p.name for p in inspect.signature(patch).parameters.values() if p.kind == p.KEYWORD_ONLY]
    assert tuple(keywords) == OPTIONS
    assert "unpad" in {f.name for f in __import__("dataclasses").fields(BertConfig)}
    config = transformers.BertConfig(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    report = patch(transformers.BertForMaskedLM(config))
    assert set(report.replaced) == set(OPTIONS)
    for switch in OPTIONS:
        report = patch(transformers.BertForMaskedLM(config), **{switch: False})
        assert switch not in report.replaced and set(report.replaced) < set(OPTIONS)
        if switch in FUSABLE:
            fused = BertConfig(fused=[switch])
            assert fused.fuses(switch) and not any(fused.fuses(s) for s in FUSABLE if s != switch)
    relu = patch(transformers.BertForMaskedLM(config.__class__(**{**config.to_dict(), "hidden_act": "relu"})))
    assert [what for what, _ in relu.left_alone] == ["bias_gelu"]
    with pytest.raises(TypeError, match="gelu"):
        patch(transformers.BertForMaskedLM(config), gelu=False)  # the old names are gone
    with pytest.raises(TypeError, match="bias_gelu, layernorm_residual, attention, mlm_loss, unpad"):
        patch_transformers(layernorm=False)
    for old in ("masked_softmax", "gelu", "layernorm"):
        with pytest.raises(ValueError, match="fused switches must be among"):
            BertConfig(fused=[old])
    with pytest.raises(ValueError, match="unknown switch"):
        BertConfig().fuses("masked_softmax")
