"""BERT under ``torch.autocast("cpu", dtype=torch.bfloat16)``: every fused op runs in bf16 with no
round trip through fp32 between them (``fastbert.models`` and ``fastbert.patch``), and a training
step's loss and parameter gradients meet the tolerance table's rule against float64: the fused
model's error at most 2x the same model's unfused (eager) error under the same autocast, plus the
bf16 atol per unit of the largest reference value."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert.models import BertConfig, BertForPreTraining, BertForSequenceClassification
from tests.utils import TOLERANCES, max_err, requires_c

transformers = pytest.importorskip("transformers")

pytestmark = requires_c

B, S, PAD = 3, 11, (4, 0)  # row 1 has 4 pad tokens, so T = 29 real tokens of B * S = 33
TOKENS = (B * S - PAD[0], B * S)
SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - PAD[0] :] = 0
    labels = torch.where((torch.rand(B, S, generator=g) < 0.4) & mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, 1] = ids[0, 1]
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)), labels


class Record(TorchDispatchMode):
    """The dtypes of every fastbert op's per-token inputs, and every dtype cast of a per-token tensor
    (rows = numel / last dim is a token count of the batch: real tokens or all positions)."""

    def __init__(self):
        super().__init__()
        self.op_dtypes, self.casts = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if name.startswith("fastbert."):
            self.op_dtypes |= {(name, a.dtype) for a in floats if per_token(a)}
        elif name == "aten._to_copy" and floats and isinstance(out, torch.Tensor) and per_token(out):
            if floats[0].dtype != out.dtype:
                self.casts.append((floats[0].dtype, out.dtype, tuple(out.shape)))
        return out


def per_token(t):
    return t.dim() >= 1 and t.shape[-1] > 0 and t.numel() // t.shape[-1] in TOKENS


def fastbert_model(cls, unpad, fused=True, seed=0):
    torch.manual_seed(seed)
    return cls(BertConfig(**SMALL, unpad=unpad, fused=fused, num_labels=2))


def hf_pair(seed=0):
    """(transformers eager model, the same weights patched with unpad=True)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**SMALL, num_labels=2, attn_implementation="eager")
    eager = transformers.BertForSequenceClassification(config)
    patched = copy.deepcopy(eager)
    fastbert.patch(patched, unpad=True)
    return eager, patched


def targets(model, labels):
    if isinstance(model, BertForPreTraining):
        return dict(labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    return dict(labels=torch.tensor([0, 1, 1]))


def step(model, inputs, labels, autocast):
    """Loss and parameter gradients of one training step (forward and loss under autocast)."""
    model.train().zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs, **targets(model, labels)).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


NAMES = ["pretraining-unpad", "pretraining-padded", "classification-unpad", "patched-hf"]


@pytest.mark.parametrize("name", NAMES)
def test_fused_ops_run_in_bf16_without_fp32_round_trips(name):
    model = pair(name, 0)[0]
    inputs, labels = batch(1)
    rec = Record()
    with rec:
        step(model, inputs, labels, autocast=True)
    ops = {name for name, _ in rec.op_dtypes}
    assert {"fastbert.layernorm_residual_fwd", "fastbert.bias_gelu_fwd", "fastbert.layernorm_residual_bwd"} <= ops
    # patched models keep transformers' embeddings (fp32 tables, fp32 LayerNorm under autocast): the
    # gather of their real rows reads fp32 and the packed rows are cast once after it
    fp32_ok = {"fastbert.unpad_rows"} if name == "patched-hf" else set()
    not_bf16 = sorted((n, str(d)) for n, d in rec.op_dtypes if d != torch.bfloat16 and n not in fp32_ok)
    assert not not_bf16, f"fused ops fed per-token tensors not in bf16: {not_bf16}"
    # the only per-token casts are at the embeddings (fp32 tables): at most 2 each way, whatever the
    # number of layers (a cast per layer would show 3 or more here)
    up = [c for c in rec.casts if c[1] == torch.float32]
    down = [c for c in rec.casts if c[1] == torch.bfloat16]
    assert len(up) <= 2 and len(down) <= 2, rec.casts


def pair(name, seed):
    """(fused model, its unfused twin with the same weights) for the accuracy test."""
    if name == "patched-hf":
        eager, patched = hf_pair(seed)
        return patched, eager
    cls = BertForPreTraining if name.startswith("pretraining") else BertForSequenceClassification
    unpad = name.endswith("unpad")
    fused = fastbert_model(cls, unpad, seed=seed)
    plain = fastbert_model(cls, unpad, fused=False, seed=seed)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("name", NAMES)
def test_bf16_step_within_tolerance_of_float64(name):
    seed = torch.randint(0, 2**31, ()).item()
    fused, plain = pair(name, seed)
    inputs, labels = batch(seed)
    ref_model = copy.deepcopy(plain).double()  # the float64 oracle: the unfused model in fp64
    ref_loss, ref_grads = step(ref_model, inputs, labels, autocast=False)
    loss, grads = step(fused, inputs, labels, autocast=True)
    eager_loss, eager_grads = step(plain, inputs, labels, autocast=True)
    atol = TOLERANCES[torch.bfloat16].atol
    checks = [("loss", loss, eager_loss, ref_loss)] + [(n, grads[n], eager_grads[n], ref_grads[n]) for n in ref_grads]
    for what, got, eager, ref in checks:
        assert torch.isfinite(got).all(), f"{what} (seed {seed}): non-finite"
        scale = max(1.0, ref.abs().max().item())
        err, eager_err = max_err(got, ref), max_err(eager, ref)
        bound = 2 * eager_err + atol * scale
        assert err <= bound, f"{what} (seed {seed}): error {err:.3g} > 2 x eager {eager_err:.3g} + {atol} x {scale:.3g}"
