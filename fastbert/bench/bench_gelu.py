"""bias + GELU: eager ``F.gelu(x + b)``, ``torch.compile`` of it, and every fastbert backend that
can run on the device (triton is skipped on CPU: its interpreter is not a benchmark).

Passes: ``fwd`` under no_grad; ``fwd+bwd`` with x and b requiring grad, ``backward`` from a
preallocated ``dy``, grads set to None at the end of each call. Minimum bytes: fwd reads x and
writes y (2N elements); fwd+bwd adds reading dy and x and writing dx (5N; bias traffic ignored).
"""

import torch
import torch.nn.functional as F

import fastbert
from fastbert.bench.candidates import timed_candidates
from fastbert.bench.harness import DTYPES, Case, numel

OP = "bias_gelu"
SHAPES = [(4096, 3072), (4096, 4096)]  # B*S = 4096 tokens; BERT-base / BERT-large FFN width
DTYPE_NAMES = ["float32", "bfloat16"]


def eager_bias_gelu(x, b, approximate="none"):
    return F.gelu(x + b, approximate=approximate)


def fastbert_fn(backend):
    def fn(x, b, approximate="none"):
        with fastbert.backend(backend):
            return fastbert.bias_gelu(x, b, approximate=approximate)

    return fn


def make_setup(shape, dtype, device, approximate, backward, use_compile=True):
    def setup():
        torch.manual_seed(0)
        dt = DTYPES[dtype]
        x = torch.randn(shape, dtype=dt, device=device, requires_grad=backward)
        b = torch.randn(shape[-1], dtype=dt, device=device, requires_grad=backward)
        dy = torch.randn(shape, dtype=dt, device=device) if backward else None
        return timed_candidates(OP, device, eager_bias_gelu, fastbert_fn, (x, b, approximate), dy, (x, b), use_compile)

    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    """The bias+GELU cases; ``--full`` adds the tanh approximation."""
    approx = ["none", "tanh"] if mode == "full" else ["none"]
    out = []
    for shape in shapes or SHAPES:
        for dtype in dtypes or DTYPE_NAMES:
            size = numel(shape) * DTYPES[dtype].itemsize
            for approximate in approx:
                for pass_, elems, backward in (("fwd", 2, False), ("fwd+bwd", 5, True)):
                    out.append(
                        Case(
                            OP,
                            tuple(shape),
                            dtype,
                            pass_,
                            elems * size,
                            make_setup(tuple(shape), dtype, device, approximate, backward, use_compile),
                            params={"approximate": approximate},
                        )
                    )
    return out
