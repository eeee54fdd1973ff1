"""Which backend runs an op.

Backends: ``cuda`` (csrc/cuda kernels in fastbert._C), ``triton`` (fastbert/triton), ``cpu``
(csrc/cpu kernels in fastbert._C) and ``reference`` (fastbert/reference.py, eager PyTorch).

``auto`` picks, per call, the first backend in the device's priority list whose
:func:`not_supported_reasons` is empty: CUDA tensors cuda -> triton -> reference, CPU tensors
cpu -> reference. ``FASTBERT_BACKEND=<name>`` or ``with fastbert.backend(name):`` forces one; a
forced backend that cannot run raises :class:`BackendUnavailable` listing the reasons, never a
silent fallback. When ``auto`` runs the (slow, eager) reference backend on CUDA tensors it warns once
per op and set of reasons (:class:`ReferenceFallbackWarning`, which names the reasons).

Callers pass the tensors whose dtype a kernel constrains as positional arguments and tensors the
kernels' glue converts (a float mask, a bias added in fp32) as ``converted=``: their device counts,
and a dtype in :data:`CONVERTED` for that (op, backend) is accepted as well as :data:`DTYPES`.

``FASTBERT_BACKEND`` sets the process default; ``with fastbert.backend(name):`` overrides it for the
current thread (and asyncio task) only, through a :class:`contextvars.ContextVar`: other threads keep
their own choice, and leaving the block restores the previous one even when it raises or when blocks
in several threads exit in any order.

Everything else :func:`select` reads is plain Python state (refreshed by :func:`refresh`), so it
traces under ``torch.compile(fullgraph=True)``. Where dynamo traces ``ContextVar.get`` (torch 2.14
does), a compiled function is guarded on the calling thread's choice. On older dynamo (torch 2.11,
where ``ContextVar.get`` graph-breaks) the compiled region reads the tracing thread's choice as a
constant and is guarded on the choice most recently entered or left in any thread: switching
backends recompiles, but a compiled function run at once by threads with *different* overrides may
run the choice it was traced with.

Triton is imported lazily: ``import fastbert`` checks only that it is installed
(``importlib.util.find_spec``). The first time the triton backend would run an op (every other reason
it could not is ruled out), :func:`select` (through :func:`reasons_for`) imports :mod:`fastbert.triton`,
which imports triton and registers the ``fastbert::<op>_*_triton`` kernels; a triton that fails to
import, or kernels that fail to register, then become the backend's reason. Importing
:mod:`fastbert.triton` (``fastbert.triton`` attribute access, ``fastbert info``) loads it as well.
Neither this module nor ``import fastbert`` imports ``torch._dynamo`` (which imports triton).
"""

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_HALF = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = {"cuda": _HALF, "triton": _HALF, "cpu": _HALF + (torch.float64,), "reference": _HALF + (torch.float64,)}
DEVICES = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpu": ("cpu",), "reference": None}
# (op, backend) -> further dtypes of the ``converted=`` tensors: the CUDA glue (csrc/cuda) converts a
# float64 additive mask (finite values clamped to fp32's range) and a float64 x_bias to fp32. The
# Triton glue checks x_bias to be fp32/fp16/bf16 and casts a float64 mask without clamping
# (finfo(float64).min becomes -inf), so float64 stays off it.
CONVERTED = {("masked_softmax", "cuda"): (torch.float64,), ("layernorm_residual", "cuda"): (torch.float64,)}
WARN_DEVICES = ("cuda",)  # device types on which ``auto`` warns when it runs the reference backend

OPS = []  # op names registered by fastbert/ops/<op>.py
# (op, backend) pairs with no kernel by design, and what runs instead
NOT_IMPLEMENTED = {
    ("varlen_attention", "cuda"): "no CUDA kernel for varlen_attention (CUDA tensors run its Triton kernels)"
}
_global = {}  # backend -> reasons it cannot run anywhere in this process
_op_missing = {}  # (op, backend) -> reason the op has no kernel on that backend
_TRITON_INTERPRET = False
_TRITON_PENDING = False  # triton is installed but fastbert.triton (its kernels) is not imported yet
_warned = set()  # (op, device, reasons) already warned about by select


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the op on these inputs."""


class ReferenceFallbackWarning(UserWarning):
    """``auto`` ran an op on the (slow, eager PyTorch) reference backend for CUDA tensors."""


def _check_name(name):
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"fastbert backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


DEFAULT = _check_name(os.environ.get("FASTBERT_BACKEND", "auto").strip().lower() or "auto")
_override = contextvars.ContextVar("fastbert_backend", default=DEFAULT)
# The choice most recently put in effect by entering or leaving ``backend()`` in any thread: what a
# compiled region is guarded on where dynamo cannot trace ContextVar.get (see the module docstring).
_last = DEFAULT


def _constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo (and with it
    triton) now: that decorator only sets this attribute, which dynamo reads when it traces a call to
    ``fn`` (it then runs ``fn`` in plain Python and uses the result as a constant)."""
    fn._dynamo_marked_constant = True
    return fn


# Whether dynamo traces ContextVar.get; None until first needed (while compiling, when torch._dynamo
# is imported anyway): checking imports torch._dynamo.
_DYNAMO_TRACES_CONTEXTVAR = None


@_constant_result
def _dynamo_traces_contextvar():
    global _DYNAMO_TRACES_CONTEXTVAR
    if _DYNAMO_TRACES_CONTEXTVAR is None:
        try:
            from torch._dynamo.variables import misc
        except Exception:  # pragma: no cover - a torch without dynamo
            _DYNAMO_TRACES_CONTEXTVAR = False
        else:
            _DYNAMO_TRACES_CONTEXTVAR = hasattr(misc, "ContextVarVariable")
    return _DYNAMO_TRACES_CONTEXTVAR


def current():
    """The backend forced in this thread/context (``FASTBERT_BACKEND`` by default), or ``"auto"``."""
    return _override.get()


@_constant_result
def _traced_override():
    return _override.get()


def _choice():
    """:func:`current`, in a form torch.compile traces (see the module docstring)."""
    if not torch.compiler.is_compiling() or _dynamo_traces_contextvar():
        return _override.get()
    # dynamo without ContextVar support: the tracing thread's choice, as a constant; testing _last
    # guards the compiled code on it (its value), so a change of choice recompiles
    return _traced_override() if _last is not None else "auto"


@contextlib.contextmanager
def backend(name):
    """``with fastbert.backend("cpu"): ...`` forces a backend in this thread/context (``"auto"``
    restores automatic choice); leaving the block restores the previous choice, also on error."""
    global _last
    token = _override.set(_check_name(name))
    _last = name
    try:
        yield
    finally:
        _override.reset(token)
        _last = _override.get()


def register_op(op):
    """Called by fastbert/ops/<op>.py; fastbert/__init__.py calls :func:`refresh` once all loaded."""
    if op not in OPS:
        OPS.append(op)


def refresh():
    """Recompute what is available (after loading _C or triton ops)."""
    global _TRITON_INTERPRET
    from fastbert import _ext

    _TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _global.clear()
    _global["reference"] = []
    _global["cpu"] = [] if _ext.C is not None else [f"fastbert._C is not available ({_ext.error})"]
    cuda = list(_global["cpu"])
    if _ext.C is not None and not _ext.C.build_info()["cuda"]:
        cuda.append("fastbert._C was built without CUDA kernels")
    _global["cuda"] = cuda
    _global["triton"] = _triton_reasons()
    _op_missing.clear()
    for op in OPS:
        for name, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if not _global[name] and not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}_fwd", key):
                _op_missing[(op, name)] = NOT_IMPLEMENTED.get(
                    (op, name), f"no {key} kernel is registered for fastbert::{op}_fwd"
                )
        if not _global["triton"] and not _TRITON_PENDING and not hasattr(torch.ops.fastbert, f"{op}_fwd_triton"):
            _op_missing[(op, "triton")] = f"no Triton kernel for {op}"


def _triton_reasons():
    """The triton backend's reasons, without importing triton: once fastbert.triton is imported,
    whether it loaded; before, only whether triton is installed (:data:`_TRITON_PENDING`: it is)."""
    global _TRITON_PENDING
    _TRITON_PENDING = False
    ft = sys.modules.get("fastbert.triton")
    if ft is not None and (getattr(ft, "available", False) or getattr(ft, "error", None)):  # imported
        return [] if ft.available else [ft.error]
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked triton
        found = False
    if not found:
        return ["triton is not installed: pip install 'fastbert[triton]'"]
    _TRITON_PENDING = True
    return []


@_constant_result
def _load_triton(op=None):
    """Import fastbert.triton (triton and the Triton kernels) unless done already; the triton
    backend's reasons for ``op`` (any op: ``None``) it leaves, as a tuple. Under torch.compile this
    runs in plain Python when traced and its result is a constant (no guard on the loading state)."""
    if _TRITON_PENDING:
        importlib.import_module("fastbert.triton")  # its __init__ calls refresh() when loaded
        refresh()
    missing = _op_missing.get((op, "triton"))
    return tuple(_global["triton"]) + ((missing,) if missing else ())


def availability(name):
    """Reasons the backend cannot run in this process at all (empty: it can run somewhere)."""
    reasons = list(_global[_check_name(name)])
    if name in ("cuda", "triton") and not reasons and not torch.cuda.is_available():
        reasons.append(
            "no CUDA device is available"
            + (" (triton runs CPU tensors under TRITON_INTERPRET=1)" if name == "triton" else "")
        )
    if name == "triton" and not reasons:
        reasons = list(_load_triton())  # the first time: whether triton and its kernels load
    return reasons


def not_supported_reasons(name, op, *tensors, converted=()):
    """Why backend ``name`` cannot run ``op`` on these tensors (``None`` entries are ignored);
    ``converted`` tensors' dtypes may also be those of :data:`CONVERTED` (see the module docstring)."""
    tensors = [t for t in tensors if t is not None]
    converted = [t for t in converted if t is not None]
    return reasons_for(
        name, op, {t.device.type for t in tensors + converted}, {t.dtype for t in tensors}, {t.dtype for t in converted}
    )


def reasons_for(name, op, devices, dtypes, converted_dtypes=()):
    """As :func:`not_supported_reasons`, for device types and dtypes instead of tensors."""
    reasons = list(_global[_check_name(name)])
    missing = _op_missing.get((op, name))
    if missing:
        reasons.append(missing)
    allowed = DEVICES[name]
    if allowed is not None:
        for dev in sorted(set(devices) - set(allowed)):
            reasons.append(f"tensors on {dev} (it runs {' and '.join(allowed)} tensors)")
    if name == "triton" and "cpu" in devices and not _TRITON_INTERPRET:
        reasons.append("CPU tensors run on triton only under TRITON_INTERPRET=1")
    extra = CONVERTED.get((op, name), ())
    bad = (set(dtypes) - set(DTYPES[name])) | (set(converted_dtypes) - set(DTYPES[name]) - set(extra))
    for dt in sorted(bad, key=str):
        reasons.append(
            f"dtype {str(dt).replace('torch.', '')} is not supported (it supports "
            f"{', '.join(str(d).replace('torch.', '') for d in DTYPES[name])})"
        )
    if name == "triton" and not reasons:
        # nothing else rules triton out: import it and its kernels now (the first time), and report
        # whether they loaded
        reasons = list(_load_triton(op))
    return reasons


def select(op, *tensors, converted=()):
    """The backend that runs ``op`` on these tensors (see the module docstring)."""
    forced = _choice()
    if forced != "auto":
        reasons = not_supported_reasons(forced, op, *tensors, converted=converted)
        if reasons:
            raise BackendUnavailable(f"fastbert: backend '{forced}' cannot run {op} here: " + "; ".join(reasons))
        return forced
    device = next(t.device.type for t in tensors if t is not None)
    why = []
    for name in PRIORITY.get(device, ("reference",)):
        reasons = not_supported_reasons(name, op, *tensors, converted=converted)
        if not reasons:
            if name == "reference" and device in WARN_DEVICES:
                _warn_reference(op, device, why)
            return name
        why.append(f"{name}: {'; '.join(reasons)}")
    return "reference"


def _warn_reference(op, device, why):
    """Warn once per (op, device, reasons) that ``auto`` runs the reference backend. Skipped while
    torch.compile traces (a warning there would break ``fullgraph=True``); eager calls warn."""
    if torch.compiler.is_compiling():
        return
    key = (op, device, tuple(why))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"fastbert: {op} runs on the reference backend (eager PyTorch, slow) for {device} "
        f"tensors because " + " | ".join(why),
        ReferenceFallbackWarning,
        stacklevel=4,
    )


def cpu_has_bf16():
    """Whether this CPU has bf16 arithmetic (AVX512-BF16, which AMX CPUs have too). Without it
    torch's bf16 matrix products run slower than fp32 (7x on an AVX2 EPYC), and some layouts (``g @ W``,
    a linear layer's input gradient; ``torch.mm(..., out=)``) fall back to a single-threaded reference
    gemm (over 100x)."""
    from fastbert import _ext

    return _ext.C is not None and "avx512bf16" in _ext.C.cpu_isas_supported()
