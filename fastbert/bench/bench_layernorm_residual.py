"""bias + dropout + residual + LayerNorm: eager ``F.layer_norm(F.dropout(x + b) + r)``,
``torch.compile`` of it, and every fastbert backend that can run on the device (triton is skipped
on CPU: its interpreter is not a benchmark).

Passes: ``fwd`` under no_grad (still in training mode, so dropout runs when p > 0); ``fwd+bwd`` with
x, r, x_bias, weight and bias requiring grad, backward from a preallocated ``dy``. Minimum bytes:
fwd reads x and r and writes y (3N elements); fwd+bwd adds reading dy, x and r and writing
dresidual, and dx too when dropout makes it differ (4N or 5N; parameters ignored).
"""

import torch
import torch.nn.functional as F

import fastbert
from fastbert.bench.candidates import timed_candidates
from fastbert.bench.harness import DTYPES, Case, numel

OP = "layernorm_residual"
SHAPES = [(4096, 768), (4096, 1024)]  # B*S = 4096 tokens; BERT-base / BERT-large hidden size
DTYPE_NAMES = ["float32", "bfloat16"]
EPS = 1e-12


def eager_fn(x, r, w, b, xb, p):
    return F.layer_norm(F.dropout(x + xb, p, training=True) + r, x.shape[-1:], w, b, EPS)


def fastbert_fn(backend):
    def fn(x, r, w, b, xb, p):
        with fastbert.backend(backend):
            return fastbert.layernorm_residual(x, r, w, b, eps=EPS, x_bias=xb, dropout_p=p, training=True)

    return fn


def make_setup(shape, dtype, device, p, backward, use_compile=True):
    def setup():
        torch.manual_seed(0)
        dt = DTYPES[dtype]
        n = shape[-1]
        x = torch.randn(shape, dtype=dt, device=device, requires_grad=backward)
        r = torch.randn(shape, dtype=dt, device=device, requires_grad=backward)
        params = [torch.randn(n, dtype=dt, device=device, requires_grad=backward) for _ in range(3)]
        dy = torch.randn(shape, dtype=dt, device=device) if backward else None
        return timed_candidates(OP, device, eager_fn, fastbert_fn, (x, r, *params, p), dy, (x, r, *params), use_compile)

    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    out = []
    for shape in shapes or SHAPES:
        for dtype in dtypes or DTYPE_NAMES:
            size = numel(shape) * DTYPES[dtype].itemsize
            for p in (0.0, 0.1):
                for pass_, elems, backward in (("fwd", 3, False), ("fwd+bwd", 7 if p == 0 else 8, True)):
                    out.append(
                        Case(
                            OP,
                            tuple(shape),
                            dtype,
                            pass_,
                            elems * size,
                            make_setup(tuple(shape), dtype, device, p, backward, use_compile),
                            params={"p": p},
                        )
                    )
    return out
