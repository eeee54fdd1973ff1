"""``fastbert`` command line (also ``python -m fastbert``): ``info``, ``bench``, ``pretrain``, ``finetune``."""

import argparse
import json
import os
import platform
import sys

import torch

import fastbert
from fastbert import _ext, backends


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect():
    """Everything ``fastbert info`` reports, as a dict."""
    import fastbert.triton as ft

    info = {
        "fastbert": fastbert.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads)",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "extension": None,
        "extension_error": _ext.error,
        "triton_interpret": backends._TRITON_INTERPRET,
        "triton_error": ft.error,
        "backend_choice": backends.current(),
        "backends": {},
        "ops": {},
    }
    if _ext.C is not None:
        built = dict(_ext.C.build_info())
        built["path"] = _ext.C.__file__
        built["cpu_isas_supported"] = list(_ext.C.cpu_isas_supported())
        built["cpu_isa_in_use"] = _ext.C.cpu_isa()
        built["FASTBERT_CPU_ISA"] = os.environ.get("FASTBERT_CPU_ISA", "auto")
        info["extension"] = built
    for name in backends.BACKENDS:
        reasons = backends.availability(name)
        info["backends"][name] = {"available": not reasons, "reasons": reasons}
    for op in backends.OPS:
        info["ops"][op] = {}
        for device in ("cpu", "cuda"):
            for name in backends.PRIORITY[device]:
                if not backends.reasons_for(name, op, {device}, {torch.float32}):
                    info["ops"][op][device] = name
                    break
    return info


def print_info(info):
    print(f"fastbert {info['fastbert']}")
    print(f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
          f"triton {info['triton'] or 'not importable'}")
    print(f"  {info['platform']}, {info['cpu']}")
    print(f"  GPUs: {', '.join(info['gpus']) or 'none visible'}")
    ext = info["extension"]
    if ext is None:
        print(f"fastbert._C: not available ({info['extension_error']})")
    else:
        print(f"fastbert._C: {ext['path']}")
        print(f"  built against torch {ext['torch']}")
        if ext["cuda"]:
            print(f"  CUDA kernels: yes (CUDA {ext['cuda_version']}, archs {ext['cuda_arch_list']})")
        else:
            print("  CUDA kernels: no (built without CUDA)")
        print(f"  CPU kernels compiled: {', '.join(ext['cpu_isas'])}; this CPU runs: "
              f"{', '.join(ext['cpu_isas_supported'])}; in use: {ext['cpu_isa_in_use']} "
              f"(FASTBERT_CPU_ISA={ext['FASTBERT_CPU_ISA']})")
    print(f"backend choice: {info['backend_choice']} (FASTBERT_BACKEND or fastbert.backend(...))")
    print(f"triton interpreter (TRITON_INTERPRET): {'on' if info['triton_interpret'] else 'off'}")
    print("backends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        print(f"  {name:<10} {state}")
    print("ops (backend auto picks for float32):")
    width = max((len(op) for op in info["ops"]), default=0)
    for op, per_device in info["ops"].items():
        print(f"  {op:<{width}}  " + ", ".join(f"{d} tensors -> {b}" for d, b in per_device.items()))


def bench(argv):
    """``fastbert bench ...``: the benchmark suite (``benchmarks/run.py``, same flags), from the
    source tree this fastbert was installed from (``pip install -e .`` / ``make``)."""
    from pathlib import Path
    root = Path(fastbert.__file__).resolve().parent.parent
    if (root / "benchmarks" / "run.py").is_file():
        sys.path.insert(0, str(root))
    try:
        from benchmarks import run
    except ImportError:
        print("fastbert bench: the benchmark suite (benchmarks/) ships with fastbert's source tree; install "
              "fastbert from a checkout (pip install -e .) and run it there", file=sys.stderr)
        return 2
    return run.main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every other flag belongs to the suite: fastbert bench --help lists them
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, what _C was built with, backends and why not")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("bench", help="run the benchmark suite (fastbert bench --help: --quick/--full, --ops, "
                   "--dtype, --device, --compare, ...)")
    from fastbert.train import commands
    commands.add_pretrain_arguments(sub.add_parser(
        "pretrain", help="pretrain BERT (MLM + NSP); no arguments: BERT-mini on the bundled Austen novels",
        description=commands.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    commands.add_finetune_arguments(sub.add_parser(
        "finetune", help="fine-tune a pretrained checkpoint on which-novel-is-this-passage-from",
        description=commands.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.command in ("pretrain", "finetune"):
        return commands.main(args.command, args)
    if args.command == "info":
        info = collect()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_info(info)
    return 0
