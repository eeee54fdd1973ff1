"""Attention softmax: eager ``F.dropout(F.softmax(x * scale + mask, -1))``, ``torch.compile`` of it,
and every fastbert backend that can run on the device (triton is skipped on CPU).

Scores ``[batch, heads, S, S]`` with a Hugging Face style additive key-padding mask ``[batch, 1, 1, S]``
(``finfo.min`` on the last eighth of the keys of every other sequence), scale ``1 / sqrt(64)``.
Passes: ``fwd`` under no_grad (dropout still runs when p > 0); ``fwd+bwd`` backward from a
preallocated ``dy``. Minimum bytes: fwd reads the scores and writes the probabilities (2N elements;
3N with dropout, which also keeps the pre-dropout softmax for the backward); fwd+bwd adds reading dy
and the saved softmax and writing dscores (5N or 6N; the mask ignored).
"""

import torch
import torch.nn.functional as F

import fastbert
from fastbert.bench.candidates import timed_candidates
from fastbert.bench.harness import DTYPES, Case, numel

OP = "masked_softmax"
SHAPES = [(32, 12, 128, 128), (8, 16, 512, 512)]  # BERT-base S=128, BERT-large S=512
DTYPE_NAMES = ["float32", "bfloat16"]
SCALE = 0.125


def eager_fn(x, mask, p):
    return F.dropout(F.softmax(x * SCALE + mask, -1), p, training=True)


def fastbert_fn(backend):
    def fn(x, mask, p):
        with fastbert.backend(backend):
            return fastbert.masked_softmax(x, mask, scale=SCALE, dropout_p=p, training=True)

    return fn


def padding_mask(batch, keys, dtype, device):
    mask = torch.zeros(batch, 1, 1, keys, dtype=dtype, device=device)
    mask[::2, ..., keys - keys // 8 :] = torch.finfo(dtype).min
    return mask


def make_setup(shape, dtype, device, p, backward, use_compile=True):
    def setup():
        torch.manual_seed(0)
        dt = DTYPES[dtype]
        x = torch.randn(shape, dtype=dt, device=device, requires_grad=backward)
        mask = padding_mask(shape[0], shape[-1], dt, device)
        dy = torch.randn(shape, dtype=dt, device=device) if backward else None
        return timed_candidates(OP, device, eager_fn, fastbert_fn, (x, mask, p), dy, (x,), use_compile)

    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    out = []
    for shape in shapes or SHAPES:
        for dtype in dtypes or DTYPE_NAMES:
            size = numel(shape) * DTYPES[dtype].itemsize
            for p in (0.0, 0.1):
                for pass_, elems, backward in (
                    ("fwd", 2 if p == 0 else 3, False),
                    ("fwd+bwd", 5 if p == 0 else 6, True),
                ):
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
