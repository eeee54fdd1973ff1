"""Fused linear + cross-entropy on every backend against the float64 reference: the fused
softmax/cross-entropy kernels on logits chunks, and the chunked op's loss and gradients."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import reference
from tests.utils import DTYPES, assert_close, backend_params, device_backend_params, requires_c, use_backend

IGNORE = -100


def make_targets(m, vocab, device, ignored=0.2):
    t = torch.randint(0, vocab, (m,), device=device)
    return torch.where(torch.rand(m, device=device) < ignored, torch.full_like(t, IGNORE), t)


# ------------------------------------------------------------------------ the fused kernel pair


def _kernels(backend):
    name = backend.partition(":")[0]
    return importlib.import_module("fastbert.ops.linear_cross_entropy")._KERNELS[name]()


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(5, 7), (9, 8000), (3, 30522), (1, 1), (0, 13), (17, 129)], ids=str)
def test_kernels_match_reference(device, backend, dtype, rows, vocab):
    logits = (torch.randn(rows, vocab, device=device) * 4).to(dtype)
    targets = make_targets(rows, vocab, device)
    row_scale = torch.rand(rows, device=device) + 0.5
    with use_backend(backend):
        fwd, bwd = _kernels(backend)
        loss, lse = fwd(logits, targets, IGNORE)
        grad = logits.clone()
        loss2, lse2 = bwd(grad, targets, row_scale, IGNORE)
    exact = reference.cross_entropy_fwd(logits.double(), targets, IGNORE)
    exact_grad = logits.double()
    reference.cross_entropy_bwd_(exact_grad, targets, row_scale.double(), IGNORE)
    # eager PyTorch in the logits' dtype (its own error sets the bound)
    x = logits.detach().requires_grad_()
    eager_loss = F.cross_entropy(x, targets, ignore_index=IGNORE, reduction="none")
    (eager_loss * row_scale.to(dtype)).sum().backward()
    eager_lse = torch.logsumexp(logits, -1)
    what = f"{backend} [{rows}, {vocab}] {dtype}"
    for name, got in (("loss", loss), ("loss (bwd)", loss2)):
        assert got.dtype == torch.float32, f"{what} {name}: {got.dtype}"
        assert_close(got.to(dtype), exact[0], eager_loss.detach(), f"{what} {name}")
    for name, got in (("lse", lse), ("lse (bwd)", lse2)):
        assert_close(got.to(dtype), exact[1], eager_lse, f"{what} {name}")
    assert_close(grad, exact_grad, x.grad, f"{what} dlogits")
    ignored = targets == IGNORE
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("device,backend", device_backend_params(kernels_only=True))
def test_kernels_extreme_logits(device, backend):
    """fp32 log-sum-exp: logits near fp16's largest values and very negative ones stay finite."""
    logits = torch.randn(4, 300, device=device) * 3
    logits[0] += 60000
    logits[1, :10] = -60000
    logits[2, 5] = 1e4
    logits = logits.half()
    targets = torch.tensor([3, 0, 5, IGNORE], device=device)
    with use_backend(backend):
        fwd, bwd = _kernels(backend)
        loss, lse = fwd(logits, targets, IGNORE)
        grad = logits.clone()
        bwd(grad, targets, torch.ones(4, device=device), IGNORE)
    exact = reference.cross_entropy_fwd(logits.double(), targets, IGNORE)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), exact[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(lse.double(), exact[1], rtol=1e-6, atol=1e-3)


# --------------------------------------------------------------------------- the chunked op


def run(backend, rows, weight, bias, targets, reduction, chunk_size, dy=None):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (rows, weight, bias)]
    with use_backend(backend):
        loss = fastbert.linear_cross_entropy(
            leaves[0], leaves[1], targets, leaves[2], ignore_index=IGNORE, reduction=reduction, chunk_size=chunk_size
        )
    loss.backward(dy if dy is not None else torch.ones_like(loss))
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


def exact_and_eager(rows, weight, bias, targets, reduction, dy):
    out = []
    for cast in (torch.float64, rows.dtype):
        leaves = [t.detach().to(cast).requires_grad_() if t is not None else None for t in (rows, weight, bias)]
        loss = reference.linear_cross_entropy(leaves[0], leaves[1], leaves[2], targets, IGNORE, reduction)
        loss.backward(dy.to(cast) if dy is not None else torch.ones_like(loss))
        out.append([loss.detach()] + [t.grad if t is not None else None for t in leaves])
    return out


def check(backend, m, hdim, vocab, dtype, device, reduction="mean", chunk_size=None, with_bias=True, ignored=0.2):
    rows = torch.randn(m, hdim, device=device).to(dtype)
    weight = (torch.randn(vocab, hdim, device=device) * hdim**-0.5).to(dtype)
    bias = (torch.randn(vocab, device=device) * 0.1).to(dtype) if with_bias else None
    targets = make_targets(m, vocab, device, ignored)
    dy = torch.randn(m, device=device).to(dtype) if reduction == "none" else None
    got = run(backend, rows, weight, bias, targets, reduction, chunk_size, dy)
    want, base = exact_and_eager(rows, weight, bias, targets, reduction, dy)
    what = f"{backend} M={m} H={hdim} V={vocab} {dtype} {reduction} chunk={chunk_size}"
    for name, g, w, e in zip(("loss", "drows", "dweight", "dbias"), got, want, base):
        if w is None:
            assert g is None
            continue
        assert_close(g, w, e, f"{what} {name}")
    return got


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "m,hdim,vocab,chunk",
    [(37, 16, 7, 8), (20, 32, 8000, None), (6, 24, 30522, 4), (13, 5, 1, 64), (40, 8, 129, 1)],
    ids=str,
)
def test_matches_reference(device, backend, dtype, reduction, m, hdim, vocab, chunk):
    check(backend, m, hdim, vocab, dtype, device, reduction, chunk)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_bias_and_all_labelled(device, backend, reduction):
    check(backend, 25, 12, 300, torch.float32, device, reduction, chunk_size=7, with_bias=False, ignored=0.0)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("m,ignored", [(0, 0.0), (9, 1.0)], ids=["no-rows", "all-ignored"])
def test_nothing_to_score_is_zero(device, backend, reduction, m, ignored):
    """M = 0, or every target ignore_index: loss 0 (not NaN) and zero gradients."""
    loss, drows, dweight, dbias = check(backend, m, 6, 11, torch.float32, device, reduction, ignored=ignored)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (drows == 0).all() and (dweight == 0).all() and (dbias == 0).all()


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous_and_master_weights(device, backend):
    """Strided rows and targets; an fp32 weight with bf16 rows is cast (autocast-style)."""
    rows = torch.randn(30, 2, 16, device=device)[:, 1]
    targets = make_targets(60, 50, device)[::2]
    weight = torch.randn(50, 16, device=device) * 0.25
    got = run(backend, rows, weight, None, targets, "mean", 8)
    want = exact_and_eager(rows, weight, None, targets, "mean", None)
    for g, w, e in zip(got[:3], want[0][:3], want[1][:3]):
        assert_close(g, w, e, backend)
    bf = run(backend, rows.bfloat16(), weight, None, targets, "mean", 8)
    assert bf[0].dtype == torch.bfloat16 and bf[1].dtype == torch.bfloat16 and bf[2].dtype == torch.float32
    torch.testing.assert_close(bf[0].float(), got[0], rtol=2e-2, atol=2e-2)


@requires_c
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cpu(reduction):
    rows = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, IGNORE, 8, 0, 3, 3, IGNORE])
    with fastbert.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda r, w, b: fastbert.linear_cross_entropy(r, w, targets, b, reduction=reduction, chunk_size=3),
            (rows, weight, bias),
        )


@requires_c
def test_opcheck():
    logits = torch.randn(6, 33)
    targets = make_targets(6, 33, "cpu")
    torch.library.opcheck(torch.ops.fastbert.linear_cross_entropy_fwd.default, (logits, targets, IGNORE))
    torch.library.opcheck(
        torch.ops.fastbert.linear_cross_entropy_bwd.default, (logits.clone(), targets, torch.rand(6), IGNORE)
    )
    rows, weight = torch.randn(6, 5, requires_grad=True), torch.randn(33, 5, requires_grad=True)
    for reduction, grad in (("mean", True), ("none", False)):
        torch.library.opcheck(
            torch.ops.fastbert.linear_cross_entropy_chunked.default,
            (rows, weight, None, targets, IGNORE, reduction, 4, grad, "cpu"),
        )


@requires_c
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if "reference" not in str(p)])
def test_torch_compile_fullgraph_dynamic_m(seed, backend):
    """The MLM loss path, gather then fused loss, in one graph for any number of labelled tokens."""
    weight = torch.randn(97, 8, requires_grad=True)
    bias = torch.zeros(97, requires_grad=True)

    def f(h, labels):
        rows, targets, _ = fastbert.gather_masked(h, labels)
        return fastbert.linear_cross_entropy(torch.tanh(rows), weight, targets, bias)

    with use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for frac in (0.15, 0.6, 0.0):
            h = torch.randn(3, 11, 8, requires_grad=True)
            labels = torch.where(torch.rand(3, 11) < frac, torch.randint(0, 97, (3, 11)), IGNORE)
            weight.grad = bias.grad = None
            loss = compiled(h, labels)
            loss.backward()
            got = (loss.detach(), h.grad, weight.grad)
            h2, w2 = h.detach().requires_grad_(), weight.detach().requires_grad_()
            rows = h2.reshape(-1, 8)[labels.reshape(-1) != IGNORE]
            ref = reference.linear_cross_entropy(
                torch.tanh(rows), w2, bias.detach(), labels.reshape(-1)[labels.reshape(-1) != IGNORE]
            )
            ref.backward()
            for g, w in zip(got, (ref.detach(), h2.grad, w2.grad)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


_PEAK = textwrap.dedent("""
    import sys, torch, fastbert
    from fastbert import reference
    torch.set_num_threads(2)
    m, h, v, fused = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "fused"

    def loss_of(rows, weight, bias, targets):
        return (fastbert.linear_cross_entropy(rows, weight, targets, bias) if fused
                else reference.linear_cross_entropy(rows, weight, bias, targets))

    def kib(field):  # from /proc/self/status: VmRSS (now) or VmHWM (peak since the last reset)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    torch.manual_seed(0)
    small = [torch.randn(4, h, requires_grad=True), torch.randn(33, h, requires_grad=True), None]
    loss_of(*small, torch.randint(0, 33, (4,))).backward()  # warm-up: lazy imports and first-call set-up
    rows = torch.randn(m, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    bias = torch.zeros(v, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    for t in (rows, weight, bias):  # the gradients' own memory, touched before the baseline
        t.grad = torch.zeros_like(t)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = kib("VmRSS")
    loss_of(rows, weight, bias, targets).backward()
    print((kib("VmHWM") - before) * 1024)
""")


@requires_c
def test_peak_memory_stays_far_below_the_logits():
    """With vocab 30522 and M = 2048 the logits alone are 250 MB (and their gradient as much): the
    fused loss must add less than a fifth of that, and the unfused one (checked too, so the
    measurement can fail) far more. Peak resident memory (VmHWM, reset just before the call) of a
    fresh process, beyond its resident memory after a warm-up call and the inputs and gradient
    buffers were made (the process-lifetime ru_maxrss also counted import-time peaks and lazy
    first-call set-up, which made the bound flaky)."""
    m, h, v = 2048, 64, 30522
    logits_bytes = m * v * 4

    def peak(kind):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(m), str(h), str(v), kind],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "FASTBERT_BACKEND": "cpu"},
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    fused, unfused = peak("fused"), peak("unfused")
    assert unfused > logits_bytes, (fused, unfused)
    assert fused < logits_bytes / 5, f"fused loss peak {fused / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"


def test_bad_input():
    rows, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3, IGNORE])
    lce = fastbert.linear_cross_entropy
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        lce(rows, weight, torch.tensor([1, 10, 3, 0]))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        lce(rows, weight, torch.tensor([1, -5, 3, 0]))
    with pytest.raises(ValueError, match="targets must be int64"):
        lce(rows, weight, targets.float())
    with pytest.raises(ValueError, match="targets must have shape"):
        lce(rows, weight, targets[:3])
    with pytest.raises(ValueError, match="rows must be"):
        lce(rows, torch.randn(10, 7), targets)
    with pytest.raises(ValueError, match="bias must have shape"):
        lce(rows, weight, targets, torch.zeros(9))
    with pytest.raises(ValueError, match="reduction"):
        lce(rows, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        lce(rows, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="weight is on meta"):
        lce(rows, weight.to("meta"), targets)


def test_module_state_dict_matches_linear():
    lin = torch.nn.Linear(8, 21)
    mod = fastbert.nn.FusedLinearCrossEntropy(8, 21)
    mod.load_state_dict(lin.state_dict())
    rows, targets = torch.randn(5, 8), torch.randint(0, 21, (5,))
    torch.testing.assert_close(mod(rows, targets), F.cross_entropy(lin(rows), targets))
    assert fastbert.nn.FusedLinearCrossEntropy(8, 21, bias=False).bias is None


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_twice_with_retain_graph(device, backend, reduction):
    """The first backward scales the forward's gradients in place and hands them out; a second
    backward through the same graph must recompute, leaving the first one's gradients intact."""
    dtype = torch.float64 if backend.startswith(("cpu", "reference")) else torch.float32  # GPU kernels: no fp64
    rows = torch.randn(11, 6, device=device, dtype=dtype)
    weight = torch.randn(23, 6, device=device, dtype=dtype)
    bias = torch.randn(23, device=device, dtype=dtype)
    targets = make_targets(11, 23, device)
    leaves = [t.clone().requires_grad_() for t in (rows, weight, bias)]
    with use_backend(backend):
        loss = fastbert.linear_cross_entropy(
            leaves[0], leaves[1], targets, leaves[2], reduction=reduction, chunk_size=4
        )
    loss.backward(torch.tensor(2.0, dtype=loss.dtype, device=device), retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward(torch.tensor(0.5, dtype=loss.dtype, device=device))
    ref_leaves = [t.clone().requires_grad_() for t in (rows, weight, bias)]
    reference.linear_cross_entropy(*ref_leaves, targets, IGNORE, reduction).backward()
    for leaf, got_first, ref in zip(leaves, first, ref_leaves):
        torch.testing.assert_close(got_first, 2.0 * ref.grad)
        torch.testing.assert_close(leaf.grad, 2.5 * ref.grad)


# ---- NaN propagation, argument range, double backward (issue 18 fuzz findings) -----------------


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_nan_weight_row_propagates_as_eager(device, backend):
    """A NaN in one row of the weight makes every logit row NaN in that column: loss and gradients NaN
    as in eager; the cpu kernel's vector max ignored NaN and its exp mapped it to 0 (a finite loss)."""
    rows = torch.randn(37, 16, device=device)
    weight = torch.randn(7, 16, device=device) * 0.25
    weight[3, 5] = float("nan")
    targets = make_targets(37, 7, device, ignored=0.0)  # (ignored rows: zero gradient by design)
    got = run(backend, rows, weight, None, targets, "none", 8, torch.ones(37, device=device))
    want, base = exact_and_eager(rows, weight, None, targets, "none", torch.ones(37, device=device))
    for name, g, w, e in zip(("loss", "drows", "dweight"), got, want, base):
        assert torch.equal(g.isnan(), e.isnan()), (
            f"{backend} {name}: NaN at {g.isnan().nonzero().tolist()}, eager at {e.isnan().nonzero().tolist()}"
        )
    with use_backend(backend):
        loss = fastbert.linear_cross_entropy(rows, weight, targets, ignore_index=IGNORE, reduction="mean", chunk_size=8)
    assert loss.isnan()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ignore_index": 2**63}, "ignore_index must fit in int64"),
        ({"ignore_index": -(2**63) - 1}, "ignore_index must fit in int64"),
        ({"chunk_size": 2**63}, "chunk_size must be a positive int below 2\\*\\*63"),
        ({"chunk_size": True}, "chunk_size"),
    ],
)
def test_out_of_range_int_arguments(kwargs, match):
    """ints beyond int64 raise a ValueError naming the argument (not the dispatcher's traceback)."""
    rows, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=match):
        fastbert.linear_cross_entropy(rows, weight, targets, **kwargs)


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_double_backward_raises(backend):
    """The gradients come from fused kernels: differentiating them (create_graph=True) raises
    instead of treating them as constants."""
    rows = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 0, IGNORE, 4])
    with use_backend(backend):
        loss = fastbert.linear_cross_entropy(rows, weight, targets)
    g_rows, g_weight = torch.autograd.grad(loss, (rows, weight), create_graph=True)
    want = torch.autograd.grad(reference.linear_cross_entropy(rows, weight, None, targets), (rows, weight))
    torch.testing.assert_close(g_rows, want[0])
    with pytest.raises(RuntimeError, match="linear_cross_entropy: double backward"):
        torch.autograd.grad(g_rows.pow(2).sum(), weight)


@pytest.mark.parametrize("backend", backend_params("cpu") + ["reference"])
@pytest.mark.parametrize("case", ["no rows", "all ignored"])
@pytest.mark.parametrize("grad", [float("inf"), float("nan")])
def test_nonfinite_incoming_gradient_without_valid_rows_gives_zero(backend, case, grad):
    """No rows (or every target ignored): eager's gradients are exact zeros whatever the incoming
    gradient (no element to scale), not 0 * inf = NaN."""
    m, targets = (0, torch.zeros(0, dtype=torch.int64)) if case == "no rows" else (2, torch.full((2,), IGNORE))
    torch.manual_seed(0)
    rows = torch.randn(m, 3).requires_grad_()
    weight = torch.randn(5, 3).requires_grad_()
    bias = torch.randn(5).requires_grad_()
    for reduction in ("mean", "sum"):
        with use_backend(backend):
            loss = fastbert.linear_cross_entropy(rows, weight, targets, bias, ignore_index=IGNORE, reduction=reduction)
        loss.backward(torch.tensor(grad))
        for name, g in (("rows", rows.grad), ("weight", weight.grad), ("bias", bias.grad)):
            assert g is not None and (g == 0).all(), f"{reduction} {name}: {g}"
        rows.grad = weight.grad = bias.grad = None


@pytest.mark.parametrize("backend", backend_params("cpu") + ["reference"])
def test_infinite_logits_give_eager_nan_loss(backend):
    """A row with a +inf logit (and -inf ones): eager's log_softmax gives NaN (inf - inf), so the
    loss is NaN, not inf (torch.logsumexp's special case)."""
    rows = torch.tensor([[1.0], [1.0]])
    weight = torch.tensor([[float("inf")], [float("-inf")], [1.0]])
    targets = torch.tensor([1, 2])
    assert F.cross_entropy(rows @ weight.t(), targets, reduction="none").isnan().all()
    with use_backend(backend):
        loss = fastbert.linear_cross_entropy(rows, weight, targets, ignore_index=IGNORE, reduction="none")
    assert loss.isnan().all(), loss


@pytest.mark.parametrize("backend", backend_params("cpu") + ["reference"])
def test_infinite_row_gradient_gives_eager_nan_at_target(backend):
    """An inf incoming gradient of a row's loss: eager's logits gradient at the target is
    -inf + p_t inf = NaN (not (p_t - 1) inf = -inf), so the target's weight row is NaN."""
    torch.manual_seed(0)
    rows, weight, targets = torch.randn(2, 3), torch.randn(4, 3), torch.tensor([1, 2])
    dy = torch.tensor([float("inf"), 1.0])
    got, want = (
        (rows.clone().requires_grad_(), weight.clone().requires_grad_()),
        (rows.double().requires_grad_(), weight.double().requires_grad_()),
    )
    with use_backend(backend):
        fastbert.linear_cross_entropy(*got, targets, ignore_index=IGNORE, reduction="none").backward(dy)
    reference.linear_cross_entropy(*want, None, targets, IGNORE, "none").backward(dy.double())
    for g, w in zip(got, want):
        assert w.grad.isnan().any() and torch.equal(g.grad.isnan(), w.grad.isnan()), (g.grad, w.grad)
        finite = dict(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        torch.testing.assert_close(
            g.grad.double().nan_to_num(**finite), w.grad.nan_to_num(**finite), rtol=1e-5, atol=1e-6
        )
