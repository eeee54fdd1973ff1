"""Stage 2 of fastbert/triton/trace_check.py (its docstring describes it): a traced kernel
regenerated from source as Inductor's wrapper regenerates a user-defined Triton kernel, loaded the
way Inductor loads its generated code, and checked for globals the regenerated source lacks."""

import os
import sys
import tempfile

from fastbert.triton import aot

_REGEN_DIR = []
_REGEN = {}


def regenerated_source(kernel):
    """The module Inductor's wrapper emits for a user-defined kernel: common Triton imports, then
    ``@triton.jit`` and the kernel's transitive source closure (without the ``user_autotune``
    decorator, which only carries launch metadata and needs a device)."""
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    return (
        TritonKernel.gen_common_triton_imports()
        + "\n@triton.jit\n"
        + user_defined_triton_kernel_transitive_closure_source_code(kernel)
    )


def unresolved_globals(kernel, namespace):
    """Globals that ``kernel`` or a ``triton.jit`` helper it reaches reads (``LOAD_GLOBAL``) and
    that ``namespace`` (a regenerated module's) lacks or binds to something else than the original
    module did: e.g. an alias ``from ._common import philox_keep as _keep`` (the closure defines
    ``philox_keep``, the kernel calls ``_keep``), or two helpers of one name from different modules
    (the closure keeps one). Returns messages; empty when the regenerated source is complete."""
    import builtins
    import dis

    from triton.runtime.jit import JITFunction

    missing, seen = [], set()

    def same(a, b):
        if isinstance(a, JITFunction):
            return isinstance(b, JITFunction) and a.src == b.src
        value = getattr(a, "value", a)  # tl.constexpr
        return getattr(b, "value", b) == value if isinstance(value, (int, float, str, bool)) else True

    def walk(jit, path):
        if id(jit) in seen:
            return
        seen.add(id(jit))
        for inst in dis.get_instructions(jit.fn):
            if inst.opname != "LOAD_GLOBAL" or hasattr(builtins, inst.argval):
                continue
            name, original = inst.argval, jit.fn.__globals__.get(inst.argval)
            if name not in jit.fn.__globals__:
                continue  # undefined in the original module too: not the regeneration's doing
            where = " -> ".join(path)
            if name not in namespace:
                what = getattr(getattr(original, "fn", original), "__qualname__", type(original).__name__)
                missing.append(
                    f"{where}: '{name}' ({what} of {getattr(original, 'module', '') or jit.fn.__module__}) "
                    f"is not defined in the regenerated source"
                )
            elif not same(original, namespace[name]):
                missing.append(f"{where}: '{name}' is bound to a different object in the regenerated source")
            if isinstance(original, JITFunction):
                walk(original, path + [name])

    walk(kernel, [kernel.fn.__name__])
    return missing


def regenerate(kernel):
    """The regenerated ``JITFunction`` of ``kernel`` (one per kernel), loaded from a file the way
    Inductor loads its generated code (``_reload_python_module``: a fresh module namespace).
    Raises if the regenerated source lacks a global the kernel uses (``unresolved_globals``)."""
    key = f"{kernel.fn.__module__}.{kernel.fn.__qualname__}"
    if key not in _REGEN:
        if not _REGEN_DIR:
            _REGEN_DIR.append(tempfile.TemporaryDirectory(prefix="fastbert_trace_check_"))
        mod_key = "regen_" + key.replace(".", "_")
        path = os.path.join(_REGEN_DIR[0].name, mod_key + ".py")
        with open(path, "w") as f:
            f.write(regenerated_source(kernel))
        try:
            from torch._inductor.runtime.compile_tasks import _reload_python_module
        except ImportError:  # older torch: the same steps
            import types

            def _reload_python_module(k, p, set_sys_modules=True):
                mod = types.ModuleType(k)
                mod.__file__ = p
                with open(p) as fh:
                    exec(compile(fh.read(), p, "exec", dont_inherit=True), mod.__dict__, mod.__dict__)
                sys.modules[k] = mod
                return mod

        mod = _reload_python_module(mod_key, path)
        _REGEN[key] = (getattr(mod, kernel.fn.__name__), unresolved_globals(kernel, vars(mod)))
    regen, missing = _REGEN[key]
    if missing:
        raise RuntimeError(
            f"Inductor's regenerated source of {aot.kernel_id(kernel)} is incomplete (under "
            f"torch.compile every launch whose specialisation reaches that code fails to "
            f"compile): " + "; ".join(missing)
        )
    return regen
