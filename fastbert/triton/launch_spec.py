"""Launch specs: the ahead-of-time compile spec of one Triton kernel launch, with exactly the
specialisation Triton's JIT computes on a CUDA launch (see :func:`launch_spec`), and their JSON
form. tests/triton_launches.py records every launch of the test suite as one; fastbert/triton/aot.py
compiles them (its docstring describes a spec's fields); fastbert/triton/trace_check.py turns the
launches of traced ops into them.
"""

import importlib

_TARGET = ("cuda", 90, 32)  # the NVIDIA backend specialises the same way for every arch
_ALIGN = 256  # CUDA allocations (the caching allocator's blocks) start 256-byte aligned (at least)


class _FakePointer:
    """What Triton's specialisation sees of a tensor argument: its dtype and its address. Fake
    tensors and CPU tensors (the interpreter's) stand for fresh CUDA allocations: the address is a
    256-aligned base plus the storage offset, so a pointer is 16-byte aligned iff
    ``storage_offset * itemsize % 16 == 0``."""

    def __init__(self, dtype, address):
        self.dtype = dtype
        self._address = address

    def data_ptr(self):
        return self._address


def _pointer(t):
    import torch

    if isinstance(t, torch.Tensor):
        try:
            from torch._subclasses.fake_tensor import is_fake

            fake = is_fake(t)
        except Exception:
            fake = False
        if t.device.type == "cuda" and not fake:
            return _FakePointer(t.dtype, t.data_ptr())  # a real launch: the real address
        return _FakePointer(t.dtype, _ALIGN + t.storage_offset() * t.element_size())
    return t


def _plain(v):
    """Launch arguments as Triton's specialisation reads them: tensors become pointers, tuples are
    walked, symbolic sizes must have a concrete value."""
    import torch

    if isinstance(v, torch.Tensor):
        return _pointer(v)
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_plain(x) for x in v)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise ValueError(f"launch_spec: symbolic argument {v!r}; pass concrete sizes")
    return v


def kernel_id(kernel):
    """``"module:qualname"`` of a ``triton.jit`` kernel, its interpreted form or the bare function."""
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):  # e.g. an Autotuner / Heuristics wrapper
        fn = fn.fn
    return f"{fn.__module__}:{fn.__qualname__}"


def resolve_kernel(kid):
    """The ``JITFunction`` named by ``kernel_id`` in this process (TRITON_INTERPRET unset)."""
    from triton.runtime.jit import JITFunction

    module, _, qualname = kid.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, JITFunction):
        raise RuntimeError(
            f"{kid}: not a compilable triton.jit kernel ({type(obj).__name__}); is TRITON_INTERPRET set?"
        )
    return obj


_JIT_CACHE = {}


def _jit_of(kernel):
    """A ``JITFunction`` for ``kernel`` used only for its specialisation code (never launched): the
    kernel itself when it is one, else one built over the interpreter's Python function with the
    same ``do_not_specialize`` options."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    kid = kernel_id(kernel)
    if kid not in _JIT_CACHE:
        fn = getattr(kernel, "fn", kernel)
        kw = getattr(kernel, "kwargs", {})  # InterpretedFunction keeps the jit options
        _JIT_CACHE[kid] = JITFunction(
            fn,
            do_not_specialize=kw.get("do_not_specialize"),
            do_not_specialize_on_alignment=kw.get("do_not_specialize_on_alignment"),
        )
    return _JIT_CACHE[kid]


_BACKEND = []
_BINDERS = {}


def _binder(jit, backend):
    """Triton's argument binder for ``jit`` (what ``JITFunction.run`` calls), built once."""
    from triton.runtime.jit import create_function_from_signature

    key = (kernel_id(jit), id(jit))
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(jit.signature, jit.params, backend)
    return _BINDERS[key]


def _backend():
    if not _BACKEND:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        _BACKEND.append(make_backend(GPUTarget(*_TARGET)))
    return _BACKEND[0]


def _json_value(v):
    """A constexpr value in a JSON-safe form (``_value`` reads it back)."""
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, tl.dtype):
        return {"dtype": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_json_value(x) for x in v]}
    raise TypeError(f"launch_spec: constexpr value {v!r} ({type(v).__name__}) is not supported")


def _value(v):
    import triton.language as tl

    if isinstance(v, dict) and "dtype" in v:
        return getattr(tl, v["dtype"]) if hasattr(tl, v["dtype"]) else tl.dtype(v["dtype"])
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_value(x) for x in v["tuple"])
    return v


def launch_spec(kernel, args, options):
    """The ahead-of-time compile spec (see the module docstring) of one kernel launch, with exactly
    the specialisation Triton's JIT computes on a CUDA launch: Triton's own binder
    (``create_function_from_signature``, i.e. ``native_specialize_impl``) and ``JITFunction._pack_args``
    run with the NVIDIA backend of ``GPUTarget("cuda", 90, 32)`` -- ints equal to 1 become
    constexprs, ints that are multiples of 16 and 16-byte-aligned pointers get
    ``tt.divisibility = 16``, ints are i32 or i64 by range, floats fp32, bools u1, None a constexpr.

    ``kernel``: the ``triton.jit`` function, or the interpreter's object for it (mapped back to the
    ``JITFunction`` by module + name when compiled). ``args``: kernel argument name -> the value the
    launcher passed (tensors -- CUDA, FakeTensor or the interpreter's CPU tensors, whose address is
    taken as a fresh CUDA allocation's: aligned iff ``storage_offset * itemsize % 16 == 0`` -- ints,
    floats, bools, None, constexpr values); arguments left out take the kernel's defaults.
    ``options``: launch options (``num_warps``, ``num_stages``, ...; the backend's defaults for the
    rest, e.g. ``num_stages=3``).

    Returns a dict: ``name``, ``kernel`` (what was passed), ``kernel_id`` (``"module:qualname"``),
    ``signature`` (runtime argument -> Triton type), ``constexprs`` (argument -> value),
    ``attrs`` (argument -> ``[[attribute, value], ...]``), ``divisible_by_16`` (the arguments with
    ``tt.divisibility`` 16), ``num_warps``, ``num_stages`` and ``options`` (the other launch options
    given), accepted by ``compile_one`` and serialisable with ``spec_to_json``."""
    import hashlib

    jit = _jit_of(kernel)
    backend = _backend()
    names = [p.name for p in jit.params]
    unknown = [a for a in args if a not in names]
    if unknown:
        raise ValueError(f"launch_spec: {kernel_id(kernel)} has no argument(s) {unknown}")
    binder = _binder(jit, backend)
    kwargs = {k: v for k, v in dict(options).items() if v is not None}
    bound, specialization, extra = binder(**{k: _plain(v) for k, v in args.items()}, **kwargs)
    opts, signature, constexprs, attrs = jit._pack_args(backend, dict(extra), bound, specialization, extra)
    for path in list(constexprs) + list(attrs):
        if len(path) != 1:
            raise ValueError(f"launch_spec: {kernel_id(kernel)}: tuple arguments are not supported")
    spec_consts = {names[p[0]]: _json_value(v) for p, v in constexprs.items()}
    spec_sig = {a: t for a, t in signature.items() if t != "constexpr"}
    spec_attrs = {names[p[0]]: [list(x) for x in v] for p, v in attrs.items() if v}
    given = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    spec = dict(
        kernel=kernel,
        kernel_id=kernel_id(kernel),
        signature=spec_sig,
        constexprs=spec_consts,
        attrs=spec_attrs,
        divisible_by_16=[a for a, v in spec_attrs.items() if ["tt.divisibility", 16] in v],
        num_warps=opts.num_warps,
        num_stages=opts.num_stages,
        options=given,
    )
    key = spec_key(spec)
    short = ",".join(f"{v}" for v in spec_consts.values() if not isinstance(v, dict))
    spec["name"] = (
        f"{spec['kernel_id'].split(':')[1].strip('_')}[{short},w{opts.num_warps}"
        f"s{opts.num_stages}#{hashlib.sha1(key.encode()).hexdigest()[:6]}]"
    )
    return spec


def spec_to_json(spec):
    """``spec`` without the kernel object (it is named by ``kernel_id``)."""
    return {k: v for k, v in spec.items() if k != "kernel"}


def spec_from_json(d):
    """A spec read back from ``spec_to_json``; its kernel is resolved in this process."""
    spec = dict(d)
    spec["kernel"] = resolve_kernel(d["kernel_id"])
    return spec


def spec_key(spec):
    """A string of what a spec's compile depends on: kernel, signature, constexprs, attributes
    (``attrs``, or ``divisible_by_16``), num_warps, num_stages and other options. Specs with equal
    keys (e.g. an ``AOT_SPECS`` entry a test also launches) compile the same code."""
    import json

    kid = spec.get("kernel_id") or kernel_id(spec["kernel"])
    attrs = spec.get("attrs")
    if attrs is None:
        attrs = {a: [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", ())}
    consts = {a: _json_value(v) for a, v in spec["constexprs"].items()}
    return json.dumps(
        [kid, spec["signature"], consts, attrs, spec.get("num_warps", 4), _num_stages(spec), spec.get("options", {})],
        sort_keys=True,
    )


def _num_stages(spec):
    """The spec's ``num_stages``; None or absent: the NVIDIA backend's default (what a launch that
    passes none gets)."""
    ns = spec.get("num_stages")
    return _backend().parse_options({}).num_stages if ns is None else ns


def load_launches(path):
    """The launch specs in a JSON file written by tests/triton_launches.py (``{"specs": [...]}``,
    each a ``spec_to_json`` dict), kernels resolved in this process."""
    import json

    with open(path) as f:
        data = json.load(f)
    return [spec_from_json(d) for d in data["specs"]]
