"""Attention over packed sequences (``--ops varlen_attention``): ``fastbert.ops.varlen_attention``
against re-padding the packed tokens and attending over the padded batch.

Workload: BERT-base self-attention (12 heads, head_dim 64) over one batch of 32 sentences whose
lengths come from bench_realistic's log-normal (median 45, sigma 0.44, clamped to 8..128, its fixed
seed: 1613 real tokens, padded length 110), fp32, attention dropout 0.1 (training). The input is the
packed ``qkv [T, 3, heads, 64]`` a QKV projection of the unpadded tokens produces (a leaf requiring
grad); ``q, k, v`` are its views. Candidates, every one returning ``[T, heads, 64]``:

* ``eager``: pad-attend-unpad in eager PyTorch: ``fastbert.ops.pad`` the qkv rows to
  ``[B, S, 3, heads, 64]``, ``scores = q @ k^T`` (MKL), ``F.dropout(F.softmax(scores * scale +
  additive key mask))``, ``probs @ v``, ``fastbert.ops.unpad`` the result;
* ``padded-fused``: the same with ``fastbert.masked_softmax`` (bool key-padding mask, dropout fused);
* ``sdpa``: the same padding with ``F.scaled_dot_product_attention`` (bool mask, dropout);
* ``fastbert-<backend>``: ``fastbert.ops.varlen_attention`` on the packed views (no padding).

Passes: ``fwd`` under no_grad (dropout still runs), ``fwd+bwd`` (backward from a preallocated
``dy``). Compute-bound: no byte count. ``x eager`` is against the eager pad-attend-unpad path.
``python -m fastbert.bench.bench_varlen_attention`` prints one quick interleaved comparison.
"""

import math

import torch
import torch.nn.functional as F

import fastbert
from fastbert.bench.bench_realistic import LENGTHS, sentence_lengths
from fastbert.bench.candidates import backend_candidates
from fastbert.bench.harness import DTYPES, EAGER, Case

OP = "varlen_attention"
HEADS, HEAD_DIM, P = 12, 64, 0.1
SHAPES = [(32, 128, HEADS, HEAD_DIM)]  # batch, max length (the clamp), heads, head_dim
PADDED_FUSED, SDPA = "padded-fused", "sdpa"
CANDIDATES = (EAGER, PADDED_FUSED, SDPA, "fastbert-cpu", "fastbert-cuda", "fastbert-triton")


def make_inputs(shape, dtype, device, backward):
    """``(qkv, packing, dy)``: a packed qkv leaf for the realistic lengths (batch ``shape[0]``)."""
    batch, max_len, heads, d = shape
    lengths = sentence_lengths(batch, hi=max_len)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    pk = fastbert.ops.packing(mask.to(device))
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(pk.total, 3, heads, d, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    dy = torch.randn(pk.total, heads, d, generator=g).to(device=device, dtype=dtype) if backward else None
    return qkv, pk, dy


def padded_attention(softmax):
    """Pad-attend-unpad with ``softmax(scores, key_mask, scale) -> probs`` (dropout included)."""

    def fn(qkv, pk):
        t, _, heads, d = qkv.shape
        x = fastbert.ops.pad(qkv, pk)  # [B, S, 3, heads, d]
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, S, d] each
        keys = pk.slot.view(pk.batch, pk.seqlen) >= 0  # [B, S], True = real token
        probs = softmax(q @ k.transpose(-1, -2), keys, 1.0 / math.sqrt(d))
        ctx = (probs @ v).transpose(1, 2)  # [B, S, heads, d]
        return fastbert.ops.unpad(ctx, pk)

    return fn


def eager_softmax(scores, keys, scale):
    add = torch.zeros(keys.shape, dtype=scores.dtype, device=scores.device).masked_fill(
        ~keys, torch.finfo(scores.dtype).min
    )
    return F.dropout(F.softmax(scores * scale + add[:, None, None, :], -1), P, training=True)


def fused_softmax(scores, keys, scale):
    return fastbert.masked_softmax(scores, keys, scale=scale, dropout_p=P, training=True)


def sdpa(qkv, pk):
    t, _, heads, d = qkv.shape
    x = fastbert.ops.pad(qkv, pk)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    keys = (pk.slot.view(pk.batch, pk.seqlen) >= 0)[:, None, None, :]
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=P).transpose(1, 2)
    return fastbert.ops.unpad(ctx, pk)


def varlen_fn(backend):
    def fn(qkv, pk):
        q, k, v = qkv.unbind(1)
        with fastbert.backend(backend):
            return fastbert.ops.varlen_attention(q, k, v, pk.cu_seqlens, pk.max_seqlen, dropout_p=P)

    return fn


def make_setup(shape, dtype, device, backward):
    def setup():
        torch.manual_seed(0)
        qkv, pk, dy = make_inputs(shape, DTYPES[dtype], device, backward)
        fns = {EAGER: padded_attention(eager_softmax), PADDED_FUSED: padded_attention(fused_softmax), SDPA: sdpa}
        fns.update(backend_candidates(device, OP, [qkv], varlen_fn))

        def wrap(fn):
            if not backward:

                def fwd():
                    with torch.no_grad():
                        return fn(qkv, pk)

                return fwd

            def fwd_bwd():
                fn(qkv, pk).backward(dy)
                qkv.grad = None

            return fwd_bwd

        return {name: wrap(fn) for name, fn in fns.items()}

    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    out = []
    dtypes = dtypes or ["float32"] + (["bfloat16"] if mode == "full" else [])
    for shape in shapes or SHAPES:
        if len(shape) != 4:
            continue
        lengths = sentence_lengths(shape[0], hi=shape[1])
        params = {"lengths": LENGTHS, "p": P, "tokens": int(lengths.sum()), "padded_len": int(lengths.max())}
        for dtype in dtypes:
            for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
                out.append(
                    Case(
                        OP,
                        tuple(shape),
                        dtype,
                        pass_,
                        None,
                        make_setup(tuple(shape), dtype, device, backward),
                        params=dict(params),
                    )
                )
    return out


def main():
    """A quick interleaved comparison on this machine (no results files)."""
    from fastbert.bench import harness

    for case in cases():
        rows = harness.run_case(case, {"device": "cpu"})
        print(case.key())
        for row in rows:
            print(
                f"  {row['candidate']:>16}: p50 {row['p50_ms']:8.2f} ms  (p20 {row['p20_ms']:.2f}, p80 "
                f"{row['p80_ms']:.2f})  x eager {row['speedup_vs_eager'] or float('nan'):.2f}"
            )


if __name__ == "__main__":
    main()
