"""What ``fastbert info`` reports: versions, the machine (CPU model, cores, GPUs), what ``fastbert._C``
was built with, and which backends can run and why not. Also used by the benchmark suite
(:mod:`fastbert.bench.report` names the results files after :func:`cpu_model`)."""

import os
import platform
import sys

import torch

import fastbert
from fastbert import _ext, backends

__all__ = ["collect", "cpu_model", "print_info"]


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
        if torch.cuda.is_available()
        else [],
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
    """Print :func:`collect`'s dict as the text of ``fastbert info``."""
    print(f"fastbert {info['fastbert']}")
    print(
        f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
        f"triton {info['triton'] or 'not importable'}"
    )
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
        print(
            f"  CPU kernels compiled: {', '.join(ext['cpu_isas'])}; this CPU runs: "
            f"{', '.join(ext['cpu_isas_supported'])}; in use: {ext['cpu_isa_in_use']} "
            f"(FASTBERT_CPU_ISA={ext['FASTBERT_CPU_ISA']})"
        )
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
