"""Benchmark harness: interleaved timing of candidates, statistics, load probe, results files.

Data model (kept flat so a CLI can compare runs):

* :class:`Case` - one op at one shape/dtype/pass; ``setup()`` builds the inputs and returns the
  candidates ``{name: zero-arg callable}`` (compilation happens there, outside the timed region).
* :func:`run_case` times the candidates of a case interleaved (round-robin per round, the order
  rotated each round) after a warm-up, and returns one flat *row* dict per candidate (``FIELDS``).
* :mod:`fastbert.bench.report` prints the table and writes ``<host-kind>.json``/``.csv`` (long format,
  the same rows; and the dated copies ``<host-kind>-<YYYY-MM-DD>.*``) with the run-level facts
  from its ``host_info``.

Timing: CPU - ``time.perf_counter`` around each call (the returned value is freed after the clock
stops); CUDA - CUDA events around each call after an L2 flush, or chunks of
``triton.testing.do_bench`` per candidate (``gpu_timer="do_bench"``), also round-robin. Nothing
here touches CUDA unless the device is ``"cuda"``.
"""

import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

SCHEMA = 1
PASSES = ("fwd", "fwd+bwd", "step")  # step: forward + backward + optimizer step (bench_bert)
EAGER, COMPILE = "eager", "torch.compile"  # the baselines speed-ups are computed against
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FIELDS = [
    "op",
    "shape",
    "dtype",
    "pass",
    "params",
    "candidate",
    "n",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "median_ci_rel",
    "bytes",
    "gbps",
    "frac_copy_bw",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "peak_mem_bytes",
    "copy_gbps",
    "loadavg_1m",
    "other_load_cores",
    "steal_cores",
    "busy",
    "device",
    "device_name",
    "host_kind",
    "torch",
    "triton",
    "fastbert",
    "git_commit",
    "torch_threads",
    "timestamp",
]
KEY = ("op", "shape", "dtype", "pass", "params")  # identifies a case across runs
# candidates some cases add to eager, torch.compile and fastbert-<backend> (a bench module whose
# candidates are all its own lists them in its CANDIDATES, as bench_bert and bench_patch do)
OTHER_CANDIDATES = {"mlm_head": ("eager+gather",)}


@dataclass
class Case:
    op: str
    shape: tuple
    dtype: str  # a key of DTYPES
    pass_: str  # one of PASSES
    bytes: Optional[int]  # minimum bytes moved by one call (None: compute-bound)
    setup: Callable[[], dict]  # -> {candidate name: zero-arg callable}
    params: dict = field(default_factory=dict)  # e.g. {"approximate": "tanh"}
    peak_memory: Optional[Callable] = None  # (fn, device) -> bytes; default harness.peak_memory
    budget: Optional["Budget"] = None  # replaces the run's budget (calls that take seconds)

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"pass_ must be one of {PASSES}, got {self.pass_!r}")

    def key(self):
        return (self.op, shape_str(self.shape), self.dtype, self.pass_, params_str(self.params))


@dataclass
class Budget:
    """Adaptive repeat policy: at least ``min_rounds``, then stop once every candidate's median is
    known to ``rel_ci`` (95% order-statistic CI half-width) or ``time_s`` has passed."""

    min_rounds: int = 10
    max_rounds: int = 1000
    time_s: float = 20.0
    rel_ci: float = 0.02
    warmup_calls: int = 2
    warmup_s: float = 0.1


# quick: every case capped at 8 s, so `make bench` stays under 10 minutes on 2 cores
QUICK = Budget(time_s=8.0)
FULL = Budget(min_rounds=20, time_s=60.0, rel_ci=0.01, warmup_calls=3, warmup_s=0.5)


def numel(shape):
    out = 1
    for d in shape:
        out *= d
    return out


def shape_str(shape):
    return "x".join(str(d) for d in shape)


def params_str(params):
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def dtype_name(name):
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} (or fp32/bf16/fp16)")
    return name


def fastbert_candidates(device=None, op=None, dtype=None):
    """``fastbert-<backend>`` names as ``fastbert.bench.candidates`` makes them (never the reference
    backend, the test oracle; never triton on CPU). With ``device``: only the backends that can
    run there (and run ``op`` in ``dtype`` when given), by fastbert's availability rules."""
    import fastbert

    out = []
    for name in fastbert.backends.BACKENDS:
        if name == "reference" or (name == "triton" and device == "cpu"):
            continue
        if device is None or not fastbert.backends.reasons_for(name, op, {device}, {DTYPES[dtype]} if dtype else set()):
            out.append(f"fastbert-{name}")
    return out


def known_candidates(modules):
    """Every candidate name the bench ``modules`` can produce (what ``--backends`` accepts)."""
    names = [EAGER, COMPILE, *fastbert_candidates()]
    for module in modules:
        names += getattr(module, "CANDIDATES", ())
    for extra in OTHER_CANDIDATES.values():
        names += extra
    return list(dict.fromkeys(names))


def expected_candidates(module, case, device):
    """The candidate names ``case`` (of bench ``module``) should have here, without running its
    ``setup()``: the module's ``CANDIDATES``, else eager, torch.compile, the op's
    ``OTHER_CANDIDATES`` and the fastbert backends that can run on ``device`` in the case's dtype.
    A guess: ``setup()`` may still leave one out (a missing kernel, transformers not installed).
    A module whose cases differ in candidates says which per case: ``case_candidates(case)``."""
    if hasattr(module, "case_candidates"):
        return list(module.case_candidates(case))
    names = getattr(module, "CANDIDATES", None)
    if names is not None:
        return list(names)
    return [EAGER, COMPILE, *OTHER_CANDIDATES.get(case.op, ()), *fastbert_candidates(device, case.op, case.dtype)]


def select_candidates(candidates, names=None):
    """``candidates`` (``{name: fn}``) restricted to ``names`` (None: all), in their order."""
    return dict(candidates) if names is None else {n: f for n, f in candidates.items() if n in names}


# ---------------------------------------------------------------- statistics


def percentile(xs, q):
    """``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci_rel(xs):
    """Half-width of the distribution-free 95% CI of the median, relative to the median."""
    xs, n = sorted(xs), len(xs)
    if n < 6:
        return math.inf
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2 ranks either side of n/2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    med = percentile(xs, 50)
    return (xs[hi] - xs[lo]) / 2 / med if med > 0 else math.inf


def gbps(nbytes, seconds):
    """GB/s at ``seconds`` a call; None for a case without a byte count (compute-bound)."""
    return nbytes / seconds / 1e9 if nbytes is not None and seconds and seconds > 0 else None


def ratio(num, den):
    return num / den if num is not None and den else None


def summarize(samples, nbytes, copy_gbps=None):
    """``{name: [seconds]}`` -> ``{name: stats}``: p20/p50/p80 (ms), GB/s from ``nbytes`` at the
    median, fraction of the copy bandwidth, speed-ups over the baselines (ratios of medians)."""
    out = {}
    for name, xs in samples.items():
        p50 = percentile(xs, 50)
        out[name] = {
            "n": len(xs),
            "p20_ms": percentile(xs, 20) * 1e3,
            "p50_ms": p50 * 1e3,
            "p80_ms": percentile(xs, 80) * 1e3,
            "median_ci_rel": median_ci_rel(xs),
            "gbps": gbps(nbytes, p50),
        }
        out[name]["frac_copy_bw"] = ratio(out[name]["gbps"], copy_gbps)
    for name, s in out.items():
        for base, col in ((EAGER, "speedup_vs_eager"), (COMPILE, "speedup_vs_compile")):
            s[col] = ratio(out[base]["p50_ms"], s["p50_ms"]) if base in out else None
    return out


def round_order(names, r):
    """Order of the candidates in round ``r``: rotated by ``r`` so none always runs first."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


# ---------------------------------------------------------------- timers


class CpuTimer:
    def round(self, calls):
        """``[(name, fn)]`` -> ``{name: [seconds]}``, one call each, in the given order."""
        out = {}
        for name, fn in calls:
            t0 = time.perf_counter()
            result = fn()
            out[name] = [time.perf_counter() - t0]
            del result
        return out


class CudaEventTimer:
    """One call per candidate per round between CUDA events, each after an L2 flush."""

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def round(self, calls):
        events, keep = [], []
        for name, fn in calls:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            keep.append(fn())
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        return {name: [s.elapsed_time(e) / 1e3] for name, s, e in events}


class DoBenchTimer:
    """A ``triton.testing.do_bench`` chunk (``chunk_ms`` long, L2 flushed) per candidate per round."""

    def __init__(self, chunk_ms=25):
        from triton.testing import do_bench

        self.do_bench, self.chunk_ms = do_bench, chunk_ms

    def round(self, calls):
        return {
            name: [t / 1e3 for t in self.do_bench(fn, warmup=1, rep=self.chunk_ms, return_mode="all")]
            for name, fn in calls
        }


def make_timer(device, gpu_timer="events"):
    if device == "cpu":
        return CpuTimer()
    return DoBenchTimer() if gpu_timer == "do_bench" else CudaEventTimer()


def time_candidates(candidates, budget, timer, clock=time.perf_counter):
    """Warm each candidate up, then time them interleaved; ``{name: [seconds]}``."""
    names = list(candidates)
    for name in names:
        t0, n = clock(), 0
        while n < budget.warmup_calls or clock() - t0 < budget.warmup_s:
            candidates[name]()
            n += 1
    samples = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0, r = clock(), 0
        while r < budget.max_rounds:
            for name, ts in timer.round([(n, candidates[n]) for n in round_order(names, r)]).items():
                samples[name].extend(ts)
            r += 1
            elapsed = clock() - t0
            if r >= budget.min_rounds and (
                elapsed >= budget.time_s or all(median_ci_rel(xs) <= budget.rel_ci for xs in samples.values())
            ):
                break
            if r >= 3 and elapsed >= 3 * budget.time_s:  # min_rounds must not blow the budget
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


# ---------------------------------------------------------------- memory and load


class _QuietStderr:
    """Silence fd 2 (the profiler's C++ start/stop lines)."""

    def __enter__(self):
        self.saved = os.dup(2)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def peak_memory(fn, device):
    """Peak bytes allocated by one call above what was allocated before it (None if unknown).
    CUDA: max_memory_allocated. CPU: allocation events of torch's CPU allocator, recorded by the
    profiler (tensor memory only; a kernel's private malloc is not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - base
    try:
        from torch.profiler import ProfilerActivity, profile

        with _QuietStderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
        deltas = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    except Exception:
        return None
    running = peak = 0
    for _, d in deltas:
        running += d
        peak = max(peak, running)
    return peak


def read_proc_stat(path="/proc/stat"):
    """Aggregate CPU ticks: (busy, steal); busy excludes idle, iowait and steal."""
    with open(path) as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait, steal = v[3], v[4], (v[7] if len(v) > 7 else 0)
    return sum(v[:8]) - idle - iowait - steal, steal


class LoadProbe:
    """CPU load seen between start() and stop(): other processes' busy time (``/proc/stat`` busy
    minus this process's CPU time) and hypervisor steal, in cores, plus the 1-min load average.
    /proc/stat counts whole ticks (10 ms), so stop() first waits until ``min_window_s`` passed."""

    def __init__(
        self,
        stat=read_proc_stat,
        own_cpu=time.process_time,
        clock=time.perf_counter,
        loadavg=os.getloadavg,
        hz=None,
        min_window_s=0.5,
    ):
        self.stat, self.own_cpu, self.clock, self.loadavg = stat, own_cpu, clock, loadavg
        self.min_window_s = min_window_s
        self.hz = hz or (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)

    def start(self):
        self.t0 = (self.stat_or_none(), self.own_cpu(), self.clock())

    def stat_or_none(self):
        try:
            return self.stat()
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        s0, own0, t0 = self.t0
        short = self.min_window_s - (self.clock() - t0)
        if short > 0:
            time.sleep(short)
        s1, own1, t1 = self.stat_or_none(), self.own_cpu(), self.clock()
        load = {"loadavg_1m": self.loadavg()[0], "other_load_cores": None, "steal_cores": None}
        if s0 is not None and s1 is not None and t1 > t0:
            busy = (s1[0] - s0[0]) / self.hz
            load["other_load_cores"] = max(0.0, busy - (own1 - own0)) / (t1 - t0)
            load["steal_cores"] = (s1[1] - s0[1]) / self.hz / (t1 - t0)
        return load


def busy_threshold(ncores):
    return max(0.25, 0.05 * ncores)


def is_busy(load, ncores, threshold=None):
    """True when other processes or hypervisor steal took more than ``threshold`` cores."""
    threshold = busy_threshold(ncores) if threshold is None else threshold
    return any((load.get(k) or 0.0) > threshold for k in ("other_load_cores", "steal_cores"))


def wait_quiet(max_s, ncores, threshold=None, window_s=1.0, probe=LoadProbe, sleep=time.sleep, clock=time.perf_counter):
    """Wait up to ``max_s`` for a ``window_s`` window without other load (shared machines).
    Returns the seconds waited, or None if the machine stayed busy."""
    t0 = clock()
    while True:
        p = probe()
        p.start()
        sleep(window_s)
        if not is_busy(p.stop(), ncores, threshold):
            return clock() - t0
        if clock() - t0 >= max_s:
            return None


# ---------------------------------------------------------------- running


def run_case(case, meta, budget=QUICK, timer=None, copy_gbps=None, busy_thr=None, probe=None, backends=None):
    """Set the case up, time its candidates (only those named in ``backends`` when given), and
    return one row per candidate (``FIELDS``); no row when none of them is left. A case's own
    ``budget`` replaces ``budget``."""
    device = meta["device"]
    budget = case.budget or budget
    timer = timer or make_timer(device)
    candidates = select_candidates(case.setup(), backends)
    if not candidates:
        return []
    probe = probe or LoadProbe()
    probe.start()
    samples = time_candidates(candidates, budget, timer)
    load = probe.stop()
    stats = summarize(samples, case.bytes, copy_gbps)
    busy = is_busy(load, meta.get("ncores") or os.cpu_count() or 1, busy_thr)
    rows = []
    for name, fn in candidates.items():
        row = dict(
            zip(KEY, case.key()),
            candidate=name,
            bytes=case.bytes,
            copy_gbps=copy_gbps,
            peak_mem_bytes=(case.peak_memory or peak_memory)(fn, device),
            busy=busy,
            **stats[name],
            **load,
        )
        row.update({k: meta.get(k) for k in FIELDS if k not in row})
        rows.append(row)
    return rows


def measure_copy_bandwidth(device, mib=256, budget=None, timer=None):
    """Machine copy bandwidth: ``dst.copy_(src)`` on preallocated, touched, out-of-cache buffers,
    timed like a case. Returns ``{"copy_gbps" (read + write bytes at the median), "copy_p50_ms",
    and the load seen}``."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    probe = LoadProbe()
    probe.start()
    samples = time_candidates(
        {"copy_": lambda: dst.copy_(src)},
        budget or Budget(min_rounds=10, time_s=3.0, rel_ci=0.01),
        timer or make_timer(device),
    )
    s = summarize(samples, 2 * n * 4)["copy_"]
    return {"copy_gbps": s["gbps"], "copy_p50_ms": s["p50_ms"], "copy_mib": mib, **probe.stop()}
