"""Ahead-of-time compile check: every Triton kernel in fastbert lowers to a cubin for real GPUs,
with the specialisations real launches produce.

``compile_all(arch, launches=...)`` compiles each specialisation listed in the ``AOT_SPECS`` of the
``fastbert.triton`` modules (production BERT shapes) and each launch spec in ``launches`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` -- no GPU and no driver
needed -- and reports per kernel the registers, spill bytes, stack and whether a cubin came out.
Registers and spills are read from the ``ptxas -v`` log of Triton's own ptxas run (Triton's
compiled metadata has no register/spill counts without a driver); when Triton's cache served the
kernel, ``ptxas -v`` is run on its PTX, and registers are taken from ``cuobjdump
--dump-resource-usage`` of the cubin when that tool is bundled.

``launch_spec(kernel, args, options)`` turns one launch (the arguments a launcher passes) into a
spec with exactly the specialisation Triton's JIT computes on a CUDA launch (ints equal to 1 become
constants, multiples of 16 and 16-byte-aligned pointers get ``tt.divisibility``, i32/i64 by value,
the backend's default ``num_stages``), using Triton's own binder. tests/triton_launches.py records
every launch of the test suite that way; tests/test_triton_aot.py compiles them.

Run ``python -m fastbert.triton.aot [--launches FILE]`` (TRITON_INTERPRET must be unset:
interpreted kernels cannot be compiled): prints a table and exits 1 if any kernel failed to compile
or spills, or if a launchable kernel (a module-level ``triton.jit`` function named ``*_kernel``) has
no ``AOT_SPECS`` entry.

A spec is a dict: ``name``, ``kernel`` (a ``triton.jit`` function; or ``kernel_id``,
``"module:qualname"``, resolved in the compiling process), ``signature`` (runtime argument name ->
Triton type such as ``"*bf16"`` or ``"i32"``), ``constexprs`` (name -> value), ``num_warps``,
``num_stages`` (None: the backend's default, 3, as for a launch that passes none),
``divisible_by_16`` (arguments a real launch would see as 16-aligned pointers / multiples of 16, so
the compiled code matches what runs), and optionally ``attrs`` (name -> ``[[attribute, value],
...]``, used instead of ``divisible_by_16``) and ``options`` (other compile options).
"""

import argparse
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time

from fastbert.triton.launch_spec import (  # noqa: F401  (launch specs: re-exported for callers of aot)
    _num_stages,
    _value,
    kernel_id,
    launch_spec,
    load_launches,
    resolve_kernel,
    spec_from_json,
    spec_key,
    spec_to_json,
)

ARCHS = (80, 90)


def _is_v4_triton():
    """Triton >= 3.3: no AttrsDescriptor; ASTSource takes the full signature (constexpr arguments
    typed ``"constexpr"``), constexprs keyed by argument path and attrs as a plain dict."""
    import triton.backends.compiler as bc
    import triton.compiler.compiler as cc

    return not hasattr(bc, "AttrsDescriptor") and not hasattr(cc, "AttrsDescriptor")


def specs():
    """``AOT_SPECS`` of every ``fastbert.triton`` module, in module order."""
    import fastbert.triton as ft

    if not ft.available:
        raise RuntimeError(ft.error)
    out = []
    for info in pkgutil.iter_modules(ft.__path__):
        if info.name in ("aot", "launch_spec", "trace_cases", "trace_check", "trace_regen"):
            continue
        mod = importlib.import_module(f"fastbert.triton.{info.name}")
        out.extend(getattr(mod, "AOT_SPECS", ()))
    return out


def uncovered():
    """Launchable kernels (module-level ``triton.jit`` functions named ``*_kernel``) of the
    fastbert.triton modules that no ``AOT_SPECS`` entry compiles."""
    from triton.runtime.jit import JITFunction

    import fastbert.triton as ft

    covered = {id(s["kernel"]) for s in specs()}
    missing = []
    for info in pkgutil.iter_modules(ft.__path__):
        if info.name in ("aot", "launch_spec", "trace_cases", "trace_check", "trace_regen"):
            continue
        mod = importlib.import_module(f"fastbert.triton.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and attr.endswith("_kernel") and id(obj) not in covered:
                missing.append(f"fastbert.triton.{info.name}.{attr}")
    return missing


def _source(spec):
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = spec["kernel"]
    if not isinstance(kernel, JITFunction) and spec.get("kernel_id"):
        kernel = resolve_kernel(spec["kernel_id"])
    names = list(kernel.arg_names)
    consts = {a: _value(v) for a, v in spec["constexprs"].items()}
    sig = spec["signature"]
    missing = [a for a in names if a not in consts and a not in sig]
    unknown = [a for a in list(consts) + list(sig) if a not in names]
    if missing or unknown:
        raise ValueError(
            f"{spec['name']}: spec does not match the kernel's arguments (missing {missing}, unknown {unknown})"
        )
    div16 = [names.index(a) for a in spec.get("divisible_by_16", ())]
    if _is_v4_triton():
        signature = {a: ("constexpr" if a in consts else sig[a]) for a in names}
        constexprs = {(names.index(a),): v for a, v in consts.items()}
        if "attrs" in spec:  # exactly the attributes a launch computed (launch_spec)
            attrs = {(names.index(a),): [list(x) for x in v] for a, v in spec["attrs"].items()}
        else:
            attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
        return ASTSource(kernel, signature, constexprs, attrs)
    # Triton 3.0-3.2 (best effort): signature without constexprs, AttrsDescriptor for the hints.
    signature = {a: sig[a] for a in names if a not in consts}
    attrs = None
    try:
        from triton.backends.compiler import AttrsDescriptor

        attrs = AttrsDescriptor.from_hints({i: 16 for i in div16})
    except Exception:
        pass
    return ASTSource(kernel, signature, dict(consts), attrs)


def _tool(name):
    """Path to a CUDA tool bundled with Triton (honours TRITON_PTXAS_PATH etc. via knobs)."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _parse_ptxas_log(log):
    """``(registers, spill_stores, spill_loads, stack)`` from a ``ptxas -v`` log of one kernel, or
    None when the log has no usage lines."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        return None
    stack, stores, loads = map(int, spill.groups())
    return int(regs.group(1)), stores, loads, stack


def _ptxas_usage(ptx, fmad=True):
    """``(registers, spill_stores, spill_loads, stack)`` from ``ptxas -v`` on the PTX (when Triton's
    own ptxas log was not seen: its cache served the kernel)."""
    ptxas = _tool("ptxas")
    if ptxas is None:
        raise RuntimeError("ptxas not found (neither bundled with triton nor on PATH)")
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={gpu}"] + ([] if fmad else ["--fmad=false"])
        r = subprocess.run(cmd + [src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({r.returncode}): {log.strip()[-2000:]}")
    usage = _parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"could not parse ptxas -v output: {log.strip()[-2000:]}")
    return usage


def _compile_logged(src, target, options):
    """``triton.compile`` with Triton's own ``ptxas -v`` log captured (it prints it when
    ``knobs.nvidia.dump_ptxas_log`` is set): ``(compiled kernel, log)``; the log is empty when the
    kernel came from Triton's cache."""
    import contextlib
    import io

    import triton

    try:
        from triton import knobs

        nv = knobs.nvidia
        saved = nv.dump_ptxas_log
    except Exception:  # no knobs: no log, ptxas is rerun
        return triton.compile(src, target=target, options=options), ""
    buf = io.StringIO()
    nv.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=target, options=options)
    finally:
        nv.dump_ptxas_log = saved
    return ck, buf.getvalue()


def _cubin_registers(cubin):
    """Registers of the (single) function in the cubin Triton produced, or None without cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)", r.stdout)
    return int(m.group(1)) if r.returncode == 0 and m else None


def compile_one(spec, arch):
    """Compile one spec for ``sm_<arch>``; returns a result dict (``error`` set on failure)."""
    from triton.backends.compiler import GPUTarget

    res = dict(
        name=spec["name"],
        arch=arch,
        registers=None,
        spill_bytes=None,
        spill_stores=None,
        spill_loads=None,
        stack_bytes=None,
        shared_bytes=None,
        cubin=False,
        error=None,
        seconds=0.0,
    )
    t0 = time.perf_counter()
    try:
        options = dict(spec.get("options", {}), num_warps=spec.get("num_warps", 4), num_stages=_num_stages(spec))
        ck, log = _compile_logged(_source(spec), GPUTarget("cuda", arch, 32), options)
        cubin = ck.asm.get("cubin")
        res["cubin"] = bool(cubin)
        res["shared_bytes"] = getattr(ck.metadata, "shared", None)
        fmad = getattr(ck.metadata, "enable_fp_fusion", True)
        regs, stores, loads, stack = _parse_ptxas_log(log) or _ptxas_usage(ck.asm["ptx"], fmad)
        if cubin:
            regs = _cubin_registers(cubin) or regs
        res.update(
            registers=regs, spill_stores=stores, spill_loads=loads, spill_bytes=stores + loads, stack_bytes=stack
        )
    except Exception as e:  # report every kernel, not just the first failure
        res["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    res["seconds"] = time.perf_counter() - t0
    return res


_WORK = []  # the specs compile_all is compiling (forked workers inherit them)


def _compile_index(job):
    i, arch = job
    return compile_one(_WORK[i], arch)


def compile_all(arch=ARCHS, name_filter=None, jobs=None, launches=()):
    """Compile every ``AOT_SPECS`` entry and every spec in ``launches`` (``launch_spec`` dicts) for
    each arch in ``arch`` (an int or a sequence of ints, e.g. 80 and 90), in ``jobs`` forked
    processes (default: one per CPU). Returns one result dict per (spec, arch), in spec order
    (``AOT_SPECS`` first): name, arch, registers, spill_bytes (stores + loads), spill_stores,
    spill_loads, stack_bytes, shared_bytes, cubin (bool), error (None or the message), seconds,
    and ``launch`` (True for a spec from ``launches``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    from triton.runtime.jit import JITFunction

    archs = (arch,) if isinstance(arch, int) else tuple(arch)
    all_specs = specs() + list(launches)
    n_aot = len(all_specs) - len(launches)
    selected, first = [], {}  # spec index -> index of the first spec that compiles the same code
    for i, spec in enumerate(all_specs):
        if name_filter and name_filter not in spec["name"]:
            continue
        if not isinstance(spec["kernel"], JITFunction):
            raise RuntimeError(
                f"{spec['name']}: not a compilable triton.jit kernel "
                f"({type(spec['kernel']).__name__}); is TRITON_INTERPRET set?"
            )
        selected.append(i)
        first.setdefault(spec_key(spec), i)
    same = {i: first[spec_key(all_specs[i])] for i in selected}
    work = [(i, a) for i in selected if same[i] == i for a in archs]
    _WORK[:] = all_specs
    jobs = min(jobs or os.cpu_count() or 1, len(work)) if work else 1
    results = None
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            ctx = multiprocessing.get_context("fork")  # children inherit the imported kernels
        except ValueError:  # no fork on this platform
            ctx = None
        if ctx is not None:
            with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                results = list(pool.map(_compile_index, work, chunksize=4))
    if results is None:
        results = [compile_one(all_specs[i], a) for i, a in work]
    done = dict(zip(work, results))
    out = []
    for i in selected:  # a spec that compiles the same code as an earlier one shares its result
        for a in archs:
            r = dict(done[(same[i], a)], name=all_specs[i]["name"], launch=i >= n_aot)
            if same[i] != i:
                r.update(seconds=0.0, same_as=all_specs[same[i]]["name"])
            out.append(r)
    return out


def ok(result):
    return result["error"] is None and result["cubin"] and result["spill_bytes"] == 0


def format_table(results):
    width = max([len(r["name"]) for r in results] + [6])
    lines = [f"{'kernel':<{width}}  arch  regs  spill  stack  shared  cubin  time   status"]
    for r in results:

        def v(k):
            return "-" if r[k] is None else str(r[k])

        status = "ok" if ok(r) else ("FAILED" if r["error"] else "SPILLS" if r["cubin"] else "NO CUBIN")
        lines.append(
            f"{r['name']:<{width}}  sm_{r['arch']:<2}  {v('registers'):>4}  "
            f"{v('spill_bytes'):>5}  {v('stack_bytes'):>5}  {v('shared_bytes'):>6}  "
            f"{'yes' if r['cubin'] else 'no':>5}  {r['seconds']:4.1f}s  {status}"
        )
    for r in results:
        if r["error"]:
            lines.append(f"\n{r['name']} sm_{r['arch']}: {r['error']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbert.triton.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    p.add_argument("--filter", default=None, help="only kernels whose spec name contains this")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel compiles (default: CPUs)")
    p.add_argument(
        "--launches", default=None, help="also compile the launch specs in this JSON file (tests/triton_launches.py)"
    )
    args = p.parse_args(argv)
    try:
        import triton
    except Exception as e:
        print(f"triton is not importable: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    launches = load_launches(args.launches) if args.launches else ()
    results = compile_all(args.arch, args.filter, args.jobs, launches)
    print(format_table(results))
    bad = [r for r in results if not ok(r)]
    missing = [] if args.filter else uncovered()
    for name in missing:
        print(f"{name}: no AOT_SPECS entry compiles this kernel")
    n_launch = sum(r["launch"] for r in results)
    shared = sum("same_as" in r for r in results)
    print(
        f"\n{len(results)} results ({len(results) - n_launch} AOT_SPECS, {n_launch} recorded launches; "
        f"{len(results) - shared} compiles, {shared} shared with an equal spec) (triton "
        f"{triton.__version__}, archs {', '.join(f'sm_{a}' for a in args.arch)}) in "
        f"{time.perf_counter() - t0:.1f}s: {len(results) - len(bad)} ok, {len(bad)} failed or spilled"
    )
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": results, "uncovered": missing}, f, indent=1)
    return 1 if bad or missing or not results else 0


if __name__ == "__main__":
    sys.exit(main())
