"""Masked-token gather on every backend against the reference: a gather is a copy, so rows, targets,
index and the scattered-back gradient must be exact."""

import pytest
import torch

import fastbert
from fastbert import reference
from tests.utils import DTYPES, backend_params, device_backend_params, requires_c, use_backend

# (hidden shape, fraction of labelled tokens): BERT-like, odd sizes, one token, none / all labelled
CASES = [
    ((2, 7, 5), 0.15),
    ((3, 128, 768), 0.15),
    ((1, 1, 1), 1.0),
    ((4, 9, 1023), 0.5),
    ((2, 16, 64), 0.0),
    ((2, 16, 64), 1.0),
    ((33, 7), 0.3),
    ((0, 5), 0.5),
    ((3, 0, 8), 0.5),
]


def make_labels(shape, frac, device, dtype=torch.int64, vocab=1000, ignore_index=-100):
    labels = torch.randint(0, vocab, shape, device=device).to(dtype)
    keep = torch.rand(shape, device=device) < frac
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


def run(backend, hidden, labels, ignore_index=-100):
    x = hidden.detach().requires_grad_()
    with use_backend(backend):
        rows, targets, index = fastbert.gather_masked(x, labels, ignore_index=ignore_index)
    dy = torch.randn_like(rows)
    rows.backward(dy)
    return rows.detach(), targets, index, x.grad, dy


def expected(hidden, labels, ignore_index, dy):
    h2, l1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows, targets, index, slot = reference.gather_masked(h2, l1, ignore_index)
    return rows, targets, index, reference.gather_masked_bwd(dy, slot).reshape(hidden.shape)


def check(backend, hidden, labels, ignore_index=-100):
    rows, targets, index, grad, dy = run(backend, hidden, labels, ignore_index)
    want = expected(hidden.detach(), labels, ignore_index, dy)
    for name, got, ref in zip(("rows", "targets", "index", "grad"), (rows, targets, index, grad), want):
        assert got.shape == ref.shape and got.dtype == ref.dtype, (
            f"{name}: {got.shape} {got.dtype} vs {ref.shape} {ref.dtype}"
        )
        assert torch.equal(got, ref), f"{backend} {name} differs"
    n_sel = int((labels != ignore_index).sum())
    assert rows.shape[0] == n_sel and targets.dtype == torch.int64 and index.dtype == torch.int64
    return rows, targets, index, grad


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,frac", CASES, ids=str)
def test_matches_reference(device, backend, dtype, shape, frac):
    hidden = torch.randn(shape, device=device).to(dtype)
    check(backend, hidden, make_labels(shape[:-1], frac, device))


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("backend", [b for b in backend_params("cpu") if "cpu" in str(b)])
@pytest.mark.parametrize("shape,dtype", [((8, 128, 1024), torch.float32), ((3, 700, 1001), torch.bfloat16)], ids=str)
def test_large_gradient_is_exact(backend, shape, dtype):
    """Gradients of many MiB, split over threads (rows of 4096 and of 2002 bytes): exact."""
    hidden = torch.randn(shape, dtype=dtype)
    check(backend, hidden, make_labels(shape[:2], 0.15, "cpu"))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_row_major_order_and_positions(device, backend):
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32, device=device).reshape(2, 4, 3)
    labels = torch.tensor([[-100, 5, -100, 7], [9, -100, -100, 2]], device=device)
    rows, targets, index, grad = check(backend, hidden, labels)
    assert index.tolist() == [1, 3, 4, 7]
    assert targets.tolist() == [5, 7, 9, 2]
    assert torch.equal(rows, hidden.reshape(-1, 3)[[1, 3, 4, 7]])
    assert (grad.reshape(-1, 3)[[0, 2, 5, 6]] == 0).all()


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_label_dtypes_and_ignore_index(device, backend, label_dtype):
    ignore = 0 if label_dtype == torch.uint8 else -1
    hidden = torch.randn(3, 11, 6, device=device)
    check(backend, hidden, make_labels((3, 11), 0.4, device, label_dtype, vocab=200, ignore_index=ignore), ignore)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous(device, backend):
    hidden = torch.randn(12, 3, 40, device=device).transpose(0, 1)[..., ::2]  # [3, 12, 20], strided
    labels = make_labels((12, 3), 0.3, device).t()
    assert not hidden.is_contiguous() and not labels.is_contiguous()
    check(backend, hidden, labels)


@requires_c
def test_gradcheck_cpu():
    hidden = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    labels = make_labels((2, 5), 0.5, "cpu")
    labels[0, 0] = 1  # at least one selected row
    with fastbert.backend("cpu"):
        assert torch.autograd.gradcheck(lambda h: fastbert.gather_masked(h, labels)[0], (hidden,))


@requires_c
def test_opcheck():
    hidden = torch.randn(4, 6, 5)
    labels = make_labels((4 * 6,), 0.4, "cpu")
    rows, _, _, slot = torch.ops.fastbert.gather_masked_fwd(hidden.reshape(-1, 5), labels, -100)
    torch.library.opcheck(
        torch.ops.fastbert.gather_masked_fwd.default,
        (hidden.reshape(-1, 5), labels, -100),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(torch.ops.fastbert.gather_masked_bwd.default, (torch.randn_like(rows), slot))


@requires_c
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if "reference" not in str(p)])
def test_torch_compile_fullgraph_dynamic_m(seed, backend):
    """M is data dependent: one compiled graph serves batches with different numbers of labels."""

    def f(h, labels):
        rows, targets, _ = fastbert.gather_masked(h, labels)
        return (rows.float() ** 2).sum(), targets

    with use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for frac in (0.1, 0.5, 0.0):
            h = torch.randn(2, 9, 4, requires_grad=True)
            labels = make_labels((2, 9), frac, "cpu")
            loss, targets = compiled(h, labels)
            loss.backward()
            want = h.detach().reshape(-1, 4)[labels.reshape(-1) != -100]
            torch.testing.assert_close(loss, (want**2).sum())
            torch.testing.assert_close(h.grad, 2 * h.detach() * (labels != -100)[..., None])
            assert torch.equal(targets, labels[labels != -100])


def test_bad_input():
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="labels"):
        fastbert.gather_masked(hidden, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be an integer"):
        fastbert.gather_masked(hidden, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="hidden must be"):
        fastbert.gather_masked(torch.randn(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="hidden must be float"):
        fastbert.gather_masked(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels is on meta"):
        fastbert.gather_masked(hidden, torch.zeros(2, 3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="ignore_index"):
        fastbert.gather_masked(hidden, torch.zeros(2, 3, dtype=torch.int64), ignore_index=0.5)


def test_module():
    gather = fastbert.nn.MaskedTokenGather(ignore_index=-1)
    hidden = torch.randn(2, 3, 4)
    labels = torch.tensor([[-1, 2, -1], [3, -1, -1]])
    rows, targets, index = gather(hidden, labels)
    assert torch.equal(rows, hidden.reshape(-1, 4)[[1, 3]]) and targets.tolist() == [2, 3]
    assert list(gather.state_dict()) == [] and "ignore_index=-1" in repr(gather)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_ignore_index_wraps_to_the_label_dtype(device, backend):
    """As torch's ``labels != ignore_index``: for uint8 labels -100 is 156, so those rows are ignored."""
    hidden = torch.randn(2, 5, 3, device=device)
    labels = torch.tensor([[156, 3, 0, 156, 7], [1, 156, 156, 2, 255]], dtype=torch.uint8, device=device)
    rows, targets, index, _ = check(backend, hidden, labels, -100)
    assert index.tolist() == [1, 2, 4, 5, 8, 9] and targets.tolist() == [3, 0, 7, 1, 2, 255]


def test_hidden_size_zero_is_a_clear_error():
    """hidden size 0: a one-line ValueError naming hidden, not a reshape traceback."""
    for shape, labels in (((2, 3, 0), torch.zeros(2, 3, dtype=torch.long)), ((4, 0), torch.zeros(4, dtype=torch.long))):
        with pytest.raises(ValueError, match="hidden must have a non-empty last"):
            fastbert.gather_masked(torch.randn(shape), labels)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastbert.gather_masked(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), ignore_index=2**63)


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_double_backward(backend):
    """The gather's backward is itself differentiable (a scatter whose gradient is the gather), so
    second derivatives through it are implemented, not silently zero."""
    hidden = torch.randn(2, 7, 5, requires_grad=True)
    labels = make_labels((2, 7), 0.5, "cpu")
    with use_backend(backend):
        rows, _, index = fastbert.gather_masked(hidden, labels)
    (g,) = torch.autograd.grad(rows.pow(3).sum(), hidden, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), hidden)
    want = torch.zeros_like(hidden).view(-1, 5)
    want[index] = 6 * hidden.detach().view(-1, 5)[index]
    torch.testing.assert_close(gg, want.view_as(hidden))
