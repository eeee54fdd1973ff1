"""One call of every public op in fastbert.ops, forward and backward, on CPU: the wheel check's smoke test.

Each op runs on small random float32 inputs with the ``cpu`` backend forced (the compiled fastbert._C:
a wheel without a working extension fails here instead of falling back to the reference) and is
compared with ``fastbert.reference`` (or plain indexing, for unpad/pad) on float64 copies of the same
inputs: the output and every input gradient, with a loose-but-real tolerance. The gradients must also
be finite and shaped like their inputs. Ops with dropout run with it on: the reference gets the seed
the op draws (``torch.manual_seed`` before each, so both draw the same one).

Usage: python scripts/wheel_smoke.py [--backend cpu|auto|reference]. Prints one line per op; exits 1 on
a failure. Every option is passed by keyword, so a reordered signature still works; a renamed one
needs a change in the CASES below only.
"""

import argparse
import inspect
import math
import sys

import torch

import fastbert
from fastbert import ops, philox, reference

RTOL, ATOL = 1e-3, 1e-4  # float32 op against the float64 reference
SEED = 1234


def training_kwargs(fn):
    """``training=True`` where the op takes it (dropout then runs); nothing where dropout_p alone decides."""
    return {"training": True} if "training" in inspect.signature(fn).parameters else {}


def drawn_seed():
    """The seed an op with dropout draws right after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    seed = philox.draw_seed(torch.device("cpu"))
    torch.manual_seed(SEED)
    return seed


def leaves(*tensors):
    """float32 leaves that require grad, and float64 copies of them for the reference."""
    ours = [t.detach().float().requires_grad_() for t in tensors]
    ref = [t.detach().double().requires_grad_() for t in tensors]
    return ours, ref


def case_bias_gelu(g):
    (x, b), (x64, b64) = leaves(torch.randn(6, 40, generator=g), torch.randn(40, generator=g))
    out = ops.bias_gelu(x, bias=b, approximate="none")
    want = reference.bias_gelu(x64, bias=b64, approximate="none")
    return out, want, [x, b], [x64, b64]


def case_bias_gelu_tanh(g):
    (x,), (x64,) = leaves(torch.randn(5, 33, generator=g))
    out = ops.bias_gelu(x, approximate="tanh")
    want = reference.bias_gelu(x64, approximate="tanh")
    return out, want, [x], [x64]


def case_layernorm_residual(g):
    h = 48
    (x, r, w, b, xb), ref = leaves(
        torch.randn(2, 7, h, generator=g),
        torch.randn(2, 7, h, generator=g),
        1 + 0.1 * torch.randn(h, generator=g),
        0.1 * torch.randn(h, generator=g),
        0.1 * torch.randn(h, generator=g),
    )
    x64, r64, w64, b64, xb64 = ref
    p = 0.1
    seed = drawn_seed()
    out = ops.layernorm_residual(
        x, r, w, b, eps=1e-5, x_bias=xb, dropout_p=p, **training_kwargs(ops.layernorm_residual)
    )
    want = reference.layernorm_residual(x64, r64, w64, b64, eps=1e-5, x_bias=xb64, dropout_p=p, seed=seed)
    return out, want, [x, r, w, b, xb], ref


def case_masked_softmax(g):
    batch, heads, q, k = 2, 3, 5, 9
    (s,), (s64,) = leaves(torch.randn(batch, heads, q, k, generator=g))
    keep = torch.ones(batch, k, dtype=torch.bool)
    keep[1, 6:] = False  # key padding in the second sequence
    scale, p = 0.125, 0.1
    seed = drawn_seed()
    out = ops.masked_softmax(s, mask=keep, scale=scale, dropout_p=p, **training_kwargs(ops.masked_softmax))
    want = reference.masked_softmax(s64, mask=keep[:, None, None, :], scale=scale, dropout_p=p, seed=seed)
    return out, want, [s], [s64]


def case_gather_masked(g):
    (hd,), (hd64,) = leaves(torch.randn(2, 8, 24, generator=g))
    labels = torch.randint(0, 50, (2, 8), generator=g)
    labels[torch.rand(2, 8, generator=g) < 0.6] = -100
    labels[0, 0] = 7  # at least one labelled row
    rows, targets, index = ops.gather_masked(hd, labels, ignore_index=-100)[:3]
    want, want_targets, want_index, _ = reference.gather_masked(
        hd64.reshape(-1, 24), labels.reshape(-1), ignore_index=-100
    )
    assert torch.equal(targets, want_targets) and torch.equal(index, want_index), "targets/index differ"
    return rows, want, [hd], [hd64]


def case_linear_cross_entropy(g):
    m, h, vocab = 10, 16, 70
    (rows, w, b), ref = leaves(
        torch.randn(m, h, generator=g), 0.2 * torch.randn(vocab, h, generator=g), 0.1 * torch.randn(vocab, generator=g)
    )
    targets = torch.randint(0, vocab, (m,), generator=g)
    targets[3] = -100
    # chunk_size=4: several chunks (a partial last one) on these 10 rows
    out = ops.linear_cross_entropy(
        rows=rows, weight=w, targets=targets, bias=b, ignore_index=-100, reduction="mean", chunk_size=4
    )
    want = reference.linear_cross_entropy(
        rows=ref[0], weight=ref[1], bias=ref[2], targets=targets, ignore_index=-100, reduction="mean"
    )
    return out, want, [rows, w, b], ref


def case_unpad_pad(g):
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    (x,), (x64,) = leaves(torch.randn(3, 6, 20, generator=g))
    p = ops.packing(mask)
    rows = ops.unpad(x, p)
    out = ops.pad(rows * 2, p)  # both ops in one graph: the gradient goes through pad's and unpad's backward
    real = mask.reshape(-1) != 0
    flat = x64.reshape(-1, 20)[real] * 2
    want = torch.zeros(18, 20, dtype=torch.float64).index_put((real.nonzero().reshape(-1),), flat)
    return out, want.reshape(3, 6, 20), [x], [x64]


def case_varlen_attention(g):
    seqlens = [5, 1, 9]
    total, heads, d = sum(seqlens), 2, 16
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32)
    (q, k, v), ref = leaves(*(torch.randn(total, heads, d, generator=g) for _ in range(3)))
    scale, p = 1 / math.sqrt(d), 0.1
    seed = drawn_seed()
    out = ops.varlen_attention(
        q,
        k,
        v,
        cu_seqlens=cu,
        max_seqlen=max(seqlens),
        scale=scale,
        dropout_p=p,
        **training_kwargs(ops.varlen_attention),
    )
    want, _ = reference.varlen_attention(
        *ref, cu_seqlens=cu, max_seqlen=max(seqlens), scale=scale, dropout_p=p, seed=seed
    )
    return out, want, [q, k, v], ref


CASES = {
    "bias_gelu": case_bias_gelu,
    "bias_gelu (tanh, no bias)": case_bias_gelu_tanh,
    "layernorm_residual (dropout)": case_layernorm_residual,
    "masked_softmax (dropout)": case_masked_softmax,
    "gather_masked": case_gather_masked,
    "linear_cross_entropy": case_linear_cross_entropy,
    "unpad + pad": case_unpad_pad,
    "varlen_attention (dropout)": case_varlen_attention,
}


def max_err(got, want):
    """Largest |got - want| beyond the tolerance's allowance, as a fraction of it (<= 1 passes)."""
    got, want = got.double(), want.double()
    allowed = ATOL + RTOL * want.abs()
    return float(((got - want).abs() / allowed).max()) if got.numel() else 0.0


def check(name, fn, g):
    out, want, inputs, ref_inputs = fn(g)
    problems = []
    if out.dtype != torch.float32 or out.shape != want.shape:
        problems.append(f"output {out.dtype} {list(out.shape)}, reference {list(want.shape)}")
    err = max_err(out.detach(), want.detach())
    if not out.isfinite().all() or err > 1:
        problems.append(f"output off by {err:.3g} x the tolerance")
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    worst = 0.0
    for i, (t, t64) in enumerate(zip(inputs, ref_inputs)):
        if t.grad is None or t.grad.shape != t.shape or not t.grad.isfinite().all():
            shape = None if t.grad is None else list(t.grad.shape)
            problems.append(f"input {i}: gradient {shape} for {list(t.shape)} (or not finite)")
            continue
        e = max_err(t.grad, t64.grad)
        worst = max(worst, e)
        if e > 1:
            problems.append(f"input {i}: gradient off by {e:.3g} x the tolerance")
    status = "FAIL: " + "; ".join(problems) if problems else "ok"
    print(f"{name:<30} {status}  (out {list(out.shape)}, {len(inputs)} grads, worst {max(err, worst):.2g} x tol)")
    return not problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", help="the backend to force (default cpu: fastbert._C)")
    args = parser.parse_args(argv)
    print(
        f"fastbert {fastbert.__version__} from {fastbert.__file__}, torch {torch.__version__}, "
        f"backend {args.backend}; tolerance rtol {RTOL} atol {ATOL} against float64"
    )
    g = torch.Generator().manual_seed(0)
    failed = []
    with fastbert.backend(args.backend):
        for name, fn in CASES.items():
            try:
                ok = check(name, fn, g)
            except Exception as e:  # one op's error must not hide the others' results
                print(f"{name:<30} FAIL: {type(e).__name__}: {e}")
                ok = False
            if not ok:
                failed.append(name)
    summary = f"wheel_smoke: {len(CASES) - len(failed)}/{len(CASES)} ok"
    print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
