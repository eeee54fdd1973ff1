"""Unpadded execution: the packing of a mask, the fused unpad/pad row copies (every backend, exact,
one-pass backward both ways), and fastbert.models on real tokens only against the padded path
(outputs at real positions, losses and every gradient) on the edge cases of real batches."""

import pytest
import torch

import fastbert
from fastbert import ops
from fastbert.models import BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertModel
from tests.utils import DTYPES, assert_grads_match, device_backend_params, use_backend


def lengths_mask(lengths, s, left=False, dtype=torch.long):
    """1 for the first ``n`` positions of each row (the last ``n`` with ``left``), 0 elsewhere."""
    pos = torch.arange(s)[None, :]
    n = torch.tensor(lengths)[:, None]
    return (pos >= s - n if left else pos < n).to(dtype)


MASKS = {
    "right": lambda: lengths_mask([5, 1, 9, 3], 9),
    "left": lambda: lengths_mask([5, 1, 9, 3], 9, left=True),
    "empty-row": lambda: lengths_mask([4, 0, 7], 7),
    "all-empty": lambda: lengths_mask([0, 0], 5),
    "holes": lambda: (torch.rand(3, 13) < 0.6).long(),
    "no-padding": lambda: torch.ones(2, 6, dtype=torch.long),
    "batch-1": lambda: lengths_mask([3], 8),
    "bool": lambda: lengths_mask([2, 6], 6, dtype=torch.bool),
    "float": lambda: lengths_mask([2, 6], 6, dtype=torch.float32),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_packing_matches_its_definition(kind):
    mask = MASKS[kind]()
    p = ops.packing(mask)
    real = mask.reshape(-1) != 0
    assert torch.equal(p.indices, real.nonzero().reshape(-1))
    lens = (mask != 0).sum(1)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0] + lens.cumsum(0).tolist()
    assert p.max_seqlen == (int(lens.max()) if len(lens) else 0)
    want_slot = torch.full((mask.numel(),), -1, dtype=torch.int64)
    want_slot[p.indices] = torch.arange(p.total)
    assert torch.equal(p.slot, want_slot) and (p.batch, p.seqlen) == tuple(mask.shape)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["right", "left", "empty-row", "all-empty", "holes"])
def test_unpad_pad_exact_with_one_pass_backward(device, backend, dtype, kind):
    mask = MASKS[kind]().to(device)
    p = ops.packing(mask)
    b, s = mask.shape
    base = torch.randn(b, s, 2 * 37, device=device).to(dtype)
    x = base[..., ::2].detach().requires_grad_()  # non-contiguous rows
    with use_backend(backend):
        rows = ops.unpad(x, p)
        assert torch.equal(rows, x.detach().reshape(b * s, -1)[p.indices])
        g = torch.randn_like(rows)
        rows.backward(g)
        want = torch.zeros(b * s, 37, device=device, dtype=dtype)
        want[p.indices] = g
        assert torch.equal(x.grad, want.view(b, s, 37))  # zeros at padding, written by the kernel

        r = torch.randn(p.total, 37, device=device).to(dtype).requires_grad_()
        padded = ops.pad(r, p)
        assert torch.equal(padded, want.new_zeros(b * s, 37).index_copy(0, p.indices, r.detach()).view(b, s, 37))
        gp = torch.randn_like(padded)
        padded.backward(gp)
        assert torch.equal(r.grad, gp.reshape(b * s, -1)[p.indices])


def test_unpad_pad_gradcheck_and_integer_ids(seed):
    p = ops.packing(MASKS["holes"]())
    x = torch.randn(3, 13, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ops.pad(ops.unpad(t, p) * 2, p), (x,))
    ids = torch.randint(0, 50, (3, 13))
    assert torch.equal(ops.unpad(ids, p), ids.reshape(-1)[p.indices])
    assert torch.equal(ops.pad(ops.unpad(ids, p), p), ids * (p.slot.view(3, 13) >= 0))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_unpad_rows_opcheck_and_second_order(seed, backend):
    """``fastbert::unpad_rows`` (the copy behind unpad and pad): opcheck, and gradients of gradients."""
    if backend == "cpu" and fastbert._ext.C is None:
        pytest.skip("fastbert._C is not available")
    p = ops.packing(MASKS["holes"]())
    x = torch.randn(3 * 13, 4, dtype=torch.float64, requires_grad=True)
    for args in ((x, p.indices, p.slot, backend), (torch.randn(p.total, 4), p.slot, p.indices, backend)):
        torch.library.opcheck(torch.ops.fastbert.unpad_rows.default, args)
    with use_backend(backend):
        torch.autograd.gradgradcheck(lambda t: ops.pad(ops.unpad(t.view(3, 13, 4), p) ** 2, p), (x,))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="attention_mask"):
        ops.packing(torch.ones(2, 3, 4))
    p = ops.packing(torch.ones(2, 3))
    with pytest.raises(ValueError, match="x must start with"):
        ops.unpad(torch.randn(3, 2, 4), p)
    with pytest.raises(ValueError, match="rows must start with"):
        ops.pad(torch.randn(5, 4), p)
    with pytest.raises(TypeError, match="packing"):
        ops.unpad(torch.randn(2, 3, 4), (1, 2))


# ------------------------------------------------------------------------------------------ models

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
HEADS = [BertModel, BertForSequenceClassification, BertForMaskedLM, BertForPreTraining]


def inputs_for(mask, vocab=97):
    b, s = mask.shape
    ids = torch.randint(1, vocab, (b, s))
    tt = (torch.arange(s) >= s // 2).long().expand(b, s).clone()
    labels = torch.where((torch.rand(b, s) < 0.4) & (mask != 0), ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt), labels


def loss_of(model, out, labels, mask, proj, pool):
    if isinstance(model, BertModel):
        real = (mask != 0)[..., None]
        return (out.last_hidden_state * real * proj).sum() + (out.pooler_output.sum() if pool else 0)
    return out.loss


def head_args(cls, labels, b):
    if cls is BertForPreTraining:
        return dict(labels=labels, next_sentence_label=torch.randint(0, 2, (b,)))
    if cls is BertForMaskedLM:
        return dict(labels=labels)
    if cls is BertForSequenceClassification:
        return dict(labels=torch.randint(0, 2, (b,)))
    return {}


def run(model, inputs, extra, labels, proj, pool=True):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **extra)
    loss_of(model, out, labels, inputs["attention_mask"], proj, pool).backward()
    return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("attention", ["varlen", "pad"])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", ["right", "no-padding", "batch-1", "bool", "empty-row", "left"])
def test_unpadded_matches_padded(seed, cls, kind, attention):
    mask = MASKS[kind]()
    if kind == "left" and cls is not BertModel:
        pytest.skip("left padding: the padded path pools position 0 (a pad); compared in BertModel below")
    torch.manual_seed(seed)
    config = BertConfig(**SMALL, unpad_attention=attention)
    unpadded = cls(config).train()
    padded = cls(config.replace(unpad=False)).train()
    padded.load_state_dict(unpadded.state_dict())
    inputs, labels = inputs_for(mask)
    b, s = mask.shape
    extra = head_args(cls, labels, b)
    proj = torch.randn(b, s, 32)
    uo, ug = run(unpadded, inputs, extra, labels, proj, pool=kind != "left")
    po, pg = run(padded, inputs, extra, labels, proj, pool=kind != "left")
    real = mask != 0
    if cls is BertModel:
        torch.testing.assert_close(uo.last_hidden_state[real], po.last_hidden_state[real], rtol=1e-5, atol=1e-5)
        assert (uo.last_hidden_state[~real] == 0).all()
        if kind == "left":  # the pooler reads each row's first real token ([CLS])
            first = real.long().argmax(1)
            want = torch.tanh(padded.pooler.dense(po.last_hidden_state[torch.arange(b), first]))
            torch.testing.assert_close(uo.pooler_output, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(uo.pooler_output, po.pooler_output, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(uo.loss, po.loss, rtol=1e-5, atol=1e-6)
    assert_grads_match(ug, pg)


# every model path: padded (fused, eager, SDPA) and unpadded (varlen, pad-attend-unpad, on each attention)
PATHS = {
    "padded-fused": dict(unpad=False),
    "padded-eager": dict(unpad=False, fused=False),
    "padded-sdpa": dict(unpad=False, attention="sdpa"),
    "varlen": dict(unpad_attention="varlen"),
    "pad": dict(unpad_attention="pad"),
    "pad-eager": dict(unpad_attention="pad", fused=False),
    "pad-sdpa": dict(unpad_attention="pad", attention="sdpa"),
}


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_fully_masked_row_is_the_same_on_every_path(seed, cls):
    """A row whose attention_mask is all zeros: zero hidden states and ``tanh(pooler.dense.bias)`` on
    every path, which agree on the hidden states at real positions, the pooled outputs, the losses
    (MLM labels at padding, the empty row's included, are ignored) and every gradient."""
    mask = lengths_mask([4, 0, 7], 7)
    inputs, labels = inputs_for(mask)
    labels = torch.where(torch.rand(labels.shape) < 0.5, inputs["input_ids"], labels)  # some at padding
    assert (labels[mask == 0] != -100).any()
    b, s = mask.shape
    extra, proj = head_args(cls, labels, b), torch.randn(b, s, 32)
    config = BertConfig(**SMALL)
    state = cls(config).state_dict()
    pooler = next(k for k in state if k.endswith("pooler.dense.bias")) if cls is not BertForMaskedLM else None
    if pooler:
        state[pooler] = torch.randn_like(state[pooler])  # a pooler of zeros is then not zero
    results = {}
    for name, changes in PATHS.items():
        model = cls(config.replace(**changes)).train()
        model.load_state_dict(state)
        results[name] = run(model, inputs, extra, labels, proj)
    real = mask != 0
    want_out, want_grads = results["padded-fused"]
    for name, (out, grads) in results.items():
        if cls is BertModel:
            hidden = out.last_hidden_state
            assert (hidden[1] == 0).all(), name
            torch.testing.assert_close(
                hidden[real], want_out.last_hidden_state[real], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}"
            )
            torch.testing.assert_close(out.pooler_output[1], torch.tanh(state[pooler]), msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(
                out.pooler_output, want_out.pooler_output, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}"
            )
        else:
            assert torch.isfinite(out.loss), name
            torch.testing.assert_close(out.loss, want_out.loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert_grads_match(grads, want_grads)


def test_logits_without_labels_at_real_positions(seed):
    config = BertConfig(**SMALL)
    unpadded = BertForMaskedLM(config).eval()
    padded = BertForMaskedLM(config.replace(unpad=False)).eval()
    padded.load_state_dict(unpadded.state_dict())
    mask = MASKS["right"]()
    inputs, _ = inputs_for(mask)
    with torch.no_grad():
        u, p = unpadded(**inputs).logits, padded(**inputs).logits
    real = mask != 0
    torch.testing.assert_close(u[real], p[real], rtol=1e-5, atol=1e-5)
    assert (u[~real] == 0).all()


def test_dropout_trains_and_is_reproducible(seed):
    config = BertConfig(**{**SMALL, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    model = BertForSequenceClassification(config).train()
    inputs, _ = inputs_for(MASKS["right"]())
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(1)
    a = model(**inputs, labels=labels).loss
    a.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    torch.manual_seed(1)
    assert torch.equal(model(**inputs, labels=labels).loss, a)
    torch.manual_seed(2)
    assert not torch.equal(model(**inputs, labels=labels).loss, a)


def test_config_unpad_fields():
    assert BertConfig().unpad is True and BertConfig().attention_for_unpadded("cpu") in ("varlen", "pad")
    assert "unpad" not in BertConfig().to_hf_dict() and "unpad_attention" not in BertConfig().to_hf_dict()
    with pytest.raises(ValueError, match="unpad_attention"):
        BertConfig(unpad_attention="flash")
    with pytest.raises(ValueError, match="unpad must be"):
        BertConfig(unpad="yes")


def test_labels_at_padding_are_ignored(seed):
    model = BertForMaskedLM(BertConfig(**SMALL)).eval()
    mask = MASKS["right"]()
    inputs, labels = inputs_for(mask)
    on_pad = labels.clone()
    on_pad[mask == 0] = inputs["input_ids"][mask == 0]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, labels=on_pad).loss, model(**inputs, labels=labels).loss)
