"""Records every launch of a fastbert Triton kernel during a pytest session, as the ahead-of-time
compile spec a CUDA launch with the same arguments would specialise to
(``fastbert.triton.aot.launch_spec``), so tests/test_triton_aot.py compiles exactly those.

``install()`` (from tests/conftest.py, at session start) wraps the ``run`` of Triton's
``InterpretedFunction`` (TRITON_INTERPRET=1: the CPU tests) and ``JITFunction`` (a GPU session);
each launch of a kernel defined under ``fastbert.`` becomes a spec at once (tensors are read for
dtype and alignment only), deduplicated by ``spec_key``. A launch whose spec cannot be computed is
kept in ``errors`` (the AOT test fails on it) and never disturbs the launching test.

``drive()`` launches each op's forward and backward kernels on a few small shapes (the edge cases
included: a row of one element, sizes not multiples of 16, dropout, masks, ragged sequences); the
AOT test uses it when the session recorded nothing (it ran alone).
"""

import contextlib
import inspect

SPECS = {}  # spec_key -> launch spec (JSON form: spec_to_json)
LAUNCHES = [0]  # launches recorded, duplicates included
ERRORS = []  # "kernel: error" for launches whose spec could not be computed
_SAVED = []  # (class, original run)
_PAUSED = [0]  # > 0 inside ``paused()``: launches run but are not recorded


def record(kernel, args, kwargs):
    """Add the spec of one launch ``kernel[grid](*args, **kwargs)``."""
    from fastbert.triton import aot

    try:
        fn = getattr(kernel, "fn", kernel)
        sig = inspect.signature(fn)
        kernel_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
        options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
        bound = sig.bind(*args, **kernel_kwargs).arguments
        spec = aot.spec_to_json(aot.launch_spec(kernel, dict(bound), options))
        SPECS.setdefault(aot.spec_key(spec), spec)
        LAUNCHES[0] += 1
    except Exception as e:  # reported by the AOT test, never raised into the launching test
        ERRORS.append(f"{aot.kernel_id(kernel)}: {type(e).__name__}: {e}")


def _wrap(run):
    def recording_run(self, *args, grid, warmup, **kwargs):
        module = getattr(getattr(self, "fn", None), "__module__", "")
        if not warmup and not _PAUSED[0] and module.startswith("fastbert."):
            record(self, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run.__wrapped__ = run
    return recording_run


def install():
    """Start recording (idempotent). False when triton is not importable."""
    if _SAVED:
        return True
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except Exception:
        return False
    for cls in (InterpretedFunction, JITFunction):
        _SAVED.append((cls, cls.run))
        cls.run = _wrap(cls.run)
    return True


def uninstall():
    while _SAVED:
        cls, run = _SAVED.pop()
        cls.run = run


@contextlib.contextmanager
def recording():
    """Record within the block (the recorder stays installed if it already was)."""
    installed = bool(_SAVED)
    install()
    try:
        yield
    finally:
        if not installed:
            uninstall()


@contextlib.contextmanager
def paused():
    """Launches within the block are not recorded (tests/test_properties.py: its random shapes would
    add hundreds of AOT compiles); nests, and the recorder stays installed."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def drive():
    """Forward and backward of every Triton op on a few small shapes, on the triton backend (CPU
    tensors under the interpreter, CUDA tensors on a GPU)."""
    import torch

    import fastbert
    from fastbert.triton._common import INTERPRET

    dev = "cpu" if INTERPRET else "cuda"
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_()

    def backward(*outs):
        loss = sum(o.float().sum() for o in outs if o.requires_grad)
        loss.backward()

    with fastbert.backend("triton"):
        for shape, dtype, approximate in (((3, 1), torch.float32, "none"), ((4, 48), torch.bfloat16, "tanh")):
            x, b = t(*shape, dtype=dtype), t(shape[-1], dtype=dtype)
            backward(fastbert.ops.bias_gelu(x, b, approximate=approximate))
        for shape, dtype, p in (
            ((3, 1), torch.float32, 0.0),
            ((2, 64), torch.bfloat16, 0.1),
            ((5, 20), torch.float16, 0.2),
        ):
            x, r, xb = t(*shape, dtype=dtype), t(*shape, dtype=dtype), t(shape[-1], dtype=dtype)
            w, b = t(shape[-1]), t(shape[-1])
            backward(fastbert.ops.layernorm_residual(x, r, w, b, x_bias=xb, dropout_p=p, training=p > 0))
        for sk, dtype, p in ((5, torch.float32, 0.0), (64, torch.bfloat16, 0.1)):
            scores = t(2, 2, 3, sk, dtype=dtype)
            keep = torch.ones(2, sk, dtype=torch.bool, device=dev)
            keep[1, sk // 2 :] = False
            backward(fastbert.ops.masked_softmax(scores, keep, scale=0.5, dropout_p=p, training=p > 0))
        hidden = t(2, 5, 8)
        labels = torch.tensor([[1, -100, 3, -100, 0], [-100, -100, 2, 4, -100]], device=dev)
        rows, targets, _ = fastbert.ops.gather_masked(hidden, labels)
        backward(rows)
        weight, bias = t(11, 8), t(11)
        backward(fastbert.ops.linear_cross_entropy(rows.detach().requires_grad_(), weight, targets, bias))
        for lengths, heads, d, dtype, p in (
            ([0, 0, 9, 0], 2, 16, torch.float32, 0.0),
            ([1, 5, 0, 17], 3, 7, torch.bfloat16, 0.1),
        ):
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(lengths).cumsum(0)
            q, k, v = t(sum(lengths), 3, heads, d, dtype=dtype).unbind(1)
            backward(fastbert.ops.varlen_attention(q, k, v, cu.to(dev), max(lengths), scale=0.25, dropout_p=p))


def dump(path):
    """Write the recorded specs (``python -m fastbert.triton.aot --launches`` reads this file)."""
    import json

    with open(path, "w") as f:
        json.dump({"launches": LAUNCHES[0], "errors": ERRORS, "specs": list(SPECS.values())}, f, indent=1)
