"""Trace check: every ``triton_op`` traces the way torch.compile traces it, and every kernel it
launches, regenerated from source as Inductor regenerates it, compiles for sm_90 -- no GPU needed.

Run ``python -m fastbert.triton.trace_check`` (TRITON_INTERPRET must be unset: under it the ops are
opaque custom ops and the kernels interpreted Python functions). It prints a table and exits 1 on
any failure (2 if it cannot run). Three stages:

1. **Trace.** Each case calls one ``torch.ops.fastbert.*_triton`` op (forward or backward) on
   FakeTensors on ``cuda`` (FakeTensorMode creates them without a device) through AOTAutograd
   (``aot_function``, the tracer behind torch.compile): its FunctionalTensorMode decomposes a
   ``triton_op`` into its body, so each ``wrap_triton`` launch becomes a
   ``triton_kernel_wrapper_functional`` node whose kernel and constant arguments sit in
   ``kernel_side_table``. The cases cover each op's dtypes, dropout on and off, optional arguments
   present and absent, a size-1 dimension and the looped/streaming kernels. The public ops
   (``fastbert.ops.*`` under ``fastbert.backend("triton")``) also go through
   ``torch.compile(fullgraph=True)`` with a capturing backend, with static shapes and with
   ``dynamic=True`` (symbolic sizes: traced and regenerated, not compiled): Dynamo must trace them
   without a graph break. Only forward graphs: AOTAutograd's joint (backward) trace runs torch's
   autograd engine, which needs a CUDA device; the backward ops are traced directly instead.
   Triton's active driver is replaced by a stand-in reporting an sm_90 target, so torch's mutation
   analysis (the TTIR of each launched kernel) runs as on an H100 instead of assuming every
   argument is written. A launch whose analysis takes an *input* of the op as written fails the
   case (unless the op's schema declares it mutable): Inductor would copy that tensor before the
   launch whenever it is a graph input or used afterwards (e.g. saved for backward).
2. **Regenerate.** For each traced kernel, the module Inductor's wrapper would emit
   (``define_user_defined_triton_kernel``): its common Triton imports, ``@triton.jit`` and
   ``user_defined_triton_kernel_transitive_closure_source_code(kernel)`` -- the kernel's source
   plus the source of every ``triton.jit`` helper and constant it reaches. The module is written
   to a file and loaded with Inductor's own loader, so only what that source defines exists. Every
   global the kernel and its helpers read must be defined there, as in the original modules
   (``unresolved_globals``): an alias such as ``from ._common import philox_keep as _keep`` is not
   (this is how torch.compile of layernorm_residual with dropout failed).
3. **Compile.** Each distinct launch is compiled for sm_90 with ``triton.compile``, from the
   regenerated kernel, with the specialisation Triton's JIT gives the traced arguments
   (``fastbert.triton.aot.launch_spec``: ints equal to 1 become constants, 16-aligned pointers and
   multiples of 16 get divisibility hints) and the launch's ``num_warps``/``num_stages``; a spill
   is a failure, as in ``python -m fastbert.triton.aot``.

Every ``*_triton`` op must have a case and every launchable kernel of fastbert.triton a traced
launch, except the opaque ops' (``OPAQUE``, ``UNTRACED``): ``fastbert::gather_masked_fwd_triton``
is deliberately not a ``triton_op`` (its output size depends on the labels; see
fastbert/triton/gather_masked.py) and ``fastbert::linear_cross_entropy_chunked`` (the public
linear_cross_entropy) is a custom op looping over row chunks; both are checked to stay one opaque
node in the traced graph. Their kernels run through Triton's own JIT (never regenerated) and are
compiled by ``python -m fastbert.triton.aot``.
"""

import argparse
import os
import sys
import time

from fastbert.triton import aot, trace_cases
from fastbert.triton.trace_regen import regenerate, regenerated_source, unresolved_globals  # noqa: F401

ARCH = 90
# ops that are custom ops by design: torch.compile calls them eagerly, so they must stay one opaque
# node in a traced graph (their kernels run through Triton's own JIT, compiled by fastbert.triton.aot)
OPAQUE = {
    "gather_masked_fwd_triton": "data-dependent output size (fastbert/triton/gather_masked.py)",
    "linear_cross_entropy_chunked": "a loop of matmuls and cross-entropy kernels over row chunks "
    "(fastbert/ops/linear_cross_entropy.py)",
}
# kernels no traced graph launches: those of the opaque ops (launched through Triton's own JIT)
UNTRACED = {
    "fastbert.triton.gather_masked:_gather_scan_kernel": "gather_masked_fwd_triton",
    "fastbert.triton.gather_masked:_gather_rows_kernel": "gather_masked_fwd_triton",
}


# ------------------------------------------------------------------------------------ stage 1


class _Sm90Driver:
    """Stands in for Triton's CUDA driver (none here): reports an H100's target, so torch's
    mutation analysis of a traced launch compiles the kernel's TTIR as on a GPU."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)


def _launches(gm):
    """``(kernel, args, grid, options, written_inputs)`` of each Triton launch node in ``gm``:
    ``options`` holds the launch's num_warps/num_stages (wrap_triton moves them into a one-config
    Autotuner); ``written_inputs``: ``(kernel argument, graph input position)`` of the arguments that are
    graph inputs and that torch takes as written by the kernel."""
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    hops = (
        torch.ops.higher_order.triton_kernel_wrapper_functional,
        torch.ops.higher_order.triton_kernel_wrapper_mutation,
    )
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in hops:
            continue
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        args = dict(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        for k, v in node.kwargs["kwargs"].items():
            args[k] = v.meta["val"] if isinstance(v, torch.fx.Node) else v
        options = {}
        configs = getattr(kernel, "configs", None)
        if configs:  # Autotuner
            cfg = configs[0]
            args.update(cfg.kwargs)
            options = {k: getattr(cfg, k) for k in ("num_warps", "num_stages") if getattr(cfg, k, None) is not None}
            kernel = kernel.fn
        # arguments torch's mutation analysis (TTIR of the kernel) takes as written: the functional
        # op clones them, so a graph input among them is copied before every launch
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        written = [
            (k, inputs.index(node.kwargs["kwargs"][k]))
            for k in node.kwargs.get("tensors_to_clone", ())
            if isinstance(node.kwargs["kwargs"].get(k), torch.fx.Node) and node.kwargs["kwargs"][k].op == "placeholder"
        ]
        out.append((kernel, args, node.kwargs["grid"], options, written))
    return out


def _opaque_calls(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fastbert.")]


def trace_op(op_name, build):
    """Trace one op call with AOTAutograd on fake CUDA tensors; returns (forward graph, launches,
    positions of the graph inputs the op's schema declares mutable)."""
    import torch
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    op = getattr(torch.ops.fastbert, op_name).default
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm

    with FakeTensorMode(shape_env=ShapeEnv()):  # a ShapeEnv for data-dependent sizes (gather_masked)
        args = build()
        pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def fn(*tensors):
            full = list(args)
            for i, tensor in zip(pos, tensors):
                full[i] = tensor
            return op(*full)

        aot_function(fn, fw_compiler=capture)(*[args[i] for i in pos])
    schema = op._schema.arguments
    mutable = {j for j, i in enumerate(pos) if schema[i].alias_info is not None and schema[i].alias_info.is_write}
    return graphs[0], _launches(graphs[0]), mutable


def trace_public(fn, build, dynamic=False):
    """torch.compile(fn, fullgraph=True, dynamic=dynamic) on fake CUDA tensors under the triton
    backend; returns (forward graph, launches, no mutable inputs)."""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import fastbert

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True, dynamic=dynamic)
    with FakeTensorMode(shape_env=ShapeEnv()), fastbert.backend("triton"):
        compiled(*build())
    return graphs[0], _launches(graphs[0]), set()


# ------------------------------------------------------------------------------------ stage 2
# regenerate, regenerated_source, unresolved_globals: fastbert/triton/trace_regen.py


# ------------------------------------------------------------------------------------ stage 3

_SPECS = []  # the specs being compiled: forked workers inherit them (kernels do not pickle)


def _compile_index(job):
    i, arch = job
    return aot.compile_one(_SPECS[i], arch)


def _compile_all(specs, arch, jobs):
    """``aot.compile_one`` of each spec for ``sm_<arch>``, in ``jobs`` forked processes."""
    _SPECS[:] = specs
    work = [(i, arch) for i in range(len(specs))]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            ctx = multiprocessing.get_context("fork")  # children inherit the regenerated kernels
        except ValueError:
            ctx = None
        if ctx is not None:
            with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                return list(pool.map(_compile_index, work))
    return [_compile_index(job) for job in work]


# ------------------------------------------------------------------------------------ driver


def _kernel_ids():
    """``kernel_id`` of every launchable kernel (a ``triton.jit`` function named ``*_kernel``) in
    the fastbert.triton modules."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastbert.triton as ft

    ids = set()
    for info in pkgutil.iter_modules(ft.__path__):
        if info.name in ("aot", "launch_spec", "trace_cases", "trace_check", "trace_regen"):
            continue
        mod = importlib.import_module(f"fastbert.triton.{info.name}")
        ids.update(
            aot.kernel_id(obj)
            for name, obj in vars(mod).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")
        )
    return sorted(ids)


def _error(e):
    """The exception's type and first lines (where torch and Triton put the cause)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()][:6]
    return f"{type(e).__name__}: " + "\n".join(lines)[:1500]


def run(arch=ARCH, name_filter=None, public=True, jobs=None):
    """All three stages. Returns a dict: ``traces`` (one per case: label, op, launches, status,
    error, seconds), ``compiles`` (one per distinct launch: aot.compile_one's result plus ``kernel``
    and ``cases``), ``missing`` (``*_triton`` ops no case calls and kernels no case launches, except
    ``UNTRACED``), ``seconds``, ``torch``, ``triton``, ``arch``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be traced or compiled")
    import torch
    import triton

    import fastbert  # noqa: F401
    import fastbert.triton as ft

    if not ft.available:
        raise RuntimeError(ft.error)
    t0 = time.perf_counter()
    driver = triton.runtime.driver
    previous = getattr(driver, "_active", None)
    driver.set_active(_Sm90Driver(arch))
    traces, launches, traced = [], {}, set()  # launches: spec key -> (spec, kernel_id, [case labels])
    try:
        # (label, op, opaque op expected instead of launches, compile the launches, trace)
        todo = [
            (f"{op}: {label}", op, op if op in OPAQUE else None, True, lambda op=op, build=build: trace_op(op, build))
            for label, op, build in trace_cases.cases()
        ]
        if public:
            # static shapes (launches compiled), then dynamic=True (what automatic dynamic shapes
            # switch to after a second shape): symbolic sizes, so traced only
            for dynamic in (False, True):
                todo += [
                    (
                        f"torch.compile{'(dynamic=True)' if dynamic else ''} {label}",
                        "torch.compile",
                        opaque,
                        not dynamic,
                        lambda fn=fn, build=build, dynamic=dynamic: trace_public(fn, build, dynamic),
                    )
                    for label, fn, build, opaque in trace_cases.public_cases()
                ]
        for label, op, opaque, compile_launches, do in todo:
            if name_filter and name_filter not in label:
                continue
            entry = dict(label=label, op=op, launches=0, status="ok", error=None, seconds=0.0)
            traces.append(entry)
            t1 = time.perf_counter()
            try:
                gm, found, mutable = do()
                entry["launches"] = len(found)
                if opaque:
                    if found or f"fastbert.{opaque}.default" not in _opaque_calls(gm):
                        raise RuntimeError(
                            f"expected an opaque fastbert.{opaque} call and no launches, got "
                            f"{_opaque_calls(gm)} and {len(found)} launches"
                        )
                    entry["status"] = f"opaque: {OPAQUE[opaque]}"
                elif not found:
                    raise RuntimeError("no Triton launch in the traced graph (the op was not decomposed)")
                for kernel, args, _grid, options, written in found:
                    bad = [a for a, i in written if i not in mutable]
                    if bad:
                        raise RuntimeError(
                            f"{aot.kernel_id(kernel)}: torch.compile's mutation analysis takes input "
                            f"argument(s) {bad} as written (a pointer stored through is computed from "
                            f"them, e.g. an offset returned by a helper that also takes them): Inductor "
                            f"then copies each such tensor before the launch whenever it is a graph input "
                            f"or is used afterwards (e.g. saved for backward)"
                        )
                    regenerated = regenerate(kernel)
                    if not compile_launches:
                        continue
                    traced.add(aot.kernel_id(kernel))
                    spec = aot.launch_spec(regenerated, args, options)
                    key = aot.spec_key(spec)
                    launches.setdefault(key, (spec, aot.kernel_id(kernel), []))[2].append(label)
            except Exception as e:
                entry["status"], entry["error"] = "FAILED", _error(e)
            entry["seconds"] = time.perf_counter() - t1
    finally:
        if hasattr(driver, "_active"):
            driver._active = previous
        else:
            driver.reset_active()
    specs = [spec for spec, _, _ in launches.values()]
    compiles = _compile_all(specs, arch, jobs) if specs else []
    for res, (_, kernel_id, labels) in zip(compiles, launches.values()):
        res["kernel"] = kernel_id  # the original kernel's (the spec names the regenerated one)
        res["cases"] = labels
    covered = {e["op"] for e in traces}
    ops = sorted(n for n in dir(torch.ops.fastbert) if n.endswith("_triton"))
    missing = [] if name_filter else [op for op in ops if op not in covered]
    missing += [] if name_filter else [k for k in _kernel_ids() if k not in traced and k not in UNTRACED]
    return dict(
        traces=traces,
        compiles=compiles,
        missing=missing,
        seconds=time.perf_counter() - t0,
        triton=triton.__version__,
        torch=torch.__version__,
        arch=arch,
    )


def ok(report):
    return (
        report["traces"]
        and not report["missing"]
        and all(e["error"] is None for e in report["traces"])
        and all(aot.ok(r) for r in report["compiles"])
    )


def format_report(report):
    width = max([len(e["label"]) for e in report["traces"]] + [4])
    lines = [f"{'case':<{width}}  launches  time   status"]
    for e in report["traces"]:
        lines.append(f"{e['label']:<{width}}  {e['launches']:>8}  {e['seconds']:4.1f}s  {e['status']}")
    for e in report["traces"]:
        if e["error"]:
            lines.append(f"\n{e['label']}: {e['error']}")
    if report["compiles"]:
        lines.append(f"\nregenerated kernels compiled for sm_{report['arch']} (one per distinct specialisation):")
        lines.append(aot.format_table(report["compiles"]))
    for name in report["missing"]:
        lines.append(f"{name}: no trace case covers this " + ("kernel" if ":" in name else "op"))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbert.triton.trace_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=ARCH, help="compute capability to compile for (default 90)")
    p.add_argument("--filter", default=None, help="only cases whose label contains this")
    p.add_argument("--no-public", action="store_true", help="skip torch.compile of the public ops")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel compiles (default: CPUs)")
    args = p.parse_args(argv)
    try:
        report = run(args.arch, args.filter, not args.no_public, args.jobs)
    except Exception as e:
        print(f"trace check could not run: {_error(e)}", file=sys.stderr)
        return 2
    print(format_report(report))
    good = ok(report)
    bad_traces = sum(e["error"] is not None for e in report["traces"])
    bad_compiles = sum(not aot.ok(r) for r in report["compiles"])
    print(
        f"\n{len(report['traces'])} traces, {len(report['compiles'])} regenerated compiles (torch "
        f"{report['torch']}, triton {report['triton']}, sm_{report['arch']}) in {report['seconds']:.1f}s: "
        f"{bad_traces} traces failed, {bad_compiles} compiles failed or spilled"
        + (f", {len(report['missing'])} ops uncovered" if report["missing"] else "")
    )
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
