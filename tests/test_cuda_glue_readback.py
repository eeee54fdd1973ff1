"""The cuda and triton backends' glue on fake CUDA tensors (see tests/test_cuda_glue.py, whose helpers
these tests share): the gather (the documented data-dependent size), ``unpad``/``pad`` given a
packing (``packing`` reads T and max_seqlen), the nn modules and a padded BERT training forward
reading nothing back, exactly the syncing ops tagged ``cudagraph_unsafe``, and the cuda sources'
host reads."""

import itertools
import pathlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import fastbert
from fastbert import backends, nn, ops
from fastbert.ops import _library
from tests.test_cuda_glue import (
    BACKEND_PARAMS,
    DTYPES,
    SYNC_ERRORS,
    Ctx,
    Record,
    _module,
    _skip_reason,
    bwd_op,
    fake_cuda,
    fwd_name,
    like,
)

# ------------------------------------------------ the gather: the documented data-dependent size


def dynamic_mode():
    return FakeTensorMode(shape_env=ShapeEnv())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gather_masked(backend):
    with dynamic_mode(), fastbert.backend(backend):
        for dtype, ldt in itertools.product(DTYPES, (torch.int64, torch.int32, torch.uint8)):
            hidden = fake_cuda(2, 6, 8, dtype=dtype, grad=True)
            labels = torch.randint(0, 5, (2, 6), device="cuda", dtype=ldt)
            with Record() as rec:
                rows, targets, index = ops.gather_masked(hidden, labels, ignore_index=0)
            m = rows.shape[0]
            assert isinstance(m, torch.SymInt)  # data-dependent: read from the device on a real run
            assert rows.shape == (m, 8) and rows.dtype == dtype and rows.device == hidden.device
            assert targets.dtype == index.dtype == torch.int64 and targets.shape == index.shape == (m,)
            mod = _module("gather_masked")
            _, args, out = rec.last(fwd_name("gather_masked", backend))
            ctx = Ctx(args)
            mod.setup_context(ctx, args, out)
            dhidden, *rest = mod.backward(ctx, bwd_op("gather_masked", backend), torch.ones_like(rows))
            assert dhidden.shape == (12, 8) and dhidden.dtype == dtype and all(r is None for r in rest)
            # the backward's own backward (double backward) is the gather again
            ctx2 = Ctx((torch.ones_like(rows), out[3]))
            mod.bwd_setup_context(ctx2, (torch.ones_like(rows), out[3]), dhidden)
            fwd = getattr(torch.ops.fastbert, fwd_name("gather_masked", backend)).default
            again, _ = mod.bwd_backward(ctx2, fwd, dhidden)
            assert again.shape[1] == 8 and again.dtype == dtype
    with FakeTensorMode(), fastbert.backend(backend), pytest.raises(SYNC_ERRORS):
        ops.gather_masked(fake_cuda(2, 6, 8), torch.randint(0, 5, (2, 6), device="cuda"))


def fake_packing(b=2, s=6, t=7):
    """A Packing of fake CUDA tensors, as ``packing`` returns on a GPU (T and max_seqlen read back)."""
    indices = torch.randint(0, b * s, (t,), device="cuda")
    cu_seqlens = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    return ops.Packing(indices, cu_seqlens, s, torch.randint(-1, t, (b * s,), device="cuda"), b, s)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_unpad_and_pad(backend):
    """Given a packing, ``unpad`` and ``pad`` (one static-shape row copy, each the other's gradient)
    and their backwards read nothing back; ``packing`` itself reads T and max_seqlen (documented)."""
    mod = _module("unpad")
    with FakeTensorMode(), fastbert.backend(backend):
        p = fake_packing()
        for dtype in DTYPES:
            x = fake_cuda(2, 6, 3, 4, dtype=dtype, grad=True)
            rows, out = ops.unpad(x, p), ops.pad(fake_cuda(7, 3, 4, dtype=dtype, grad=True), p)
            assert rows.shape == (7, 3, 4) and rows.dtype == dtype and rows.device == x.device
            assert out.shape == (2, 6, 3, 4) and out.dtype == dtype and out.device == x.device
            for index, inverse, m, n in ((p.indices, p.slot, 12, 7), (p.slot, p.indices, 7, 12)):  # unpad, pad
                src = fake_cuda(m, 12, dtype=dtype)
                with Record() as rec:
                    got = mod.unpad_rows(src, index, inverse, backend)
                assert got.shape == (n, 12) and got.dtype == dtype
                assert [c[0].name() for c in rec.calls][-1] == "fastbert::unpad_rows"
                ctx = Ctx((src, index, inverse, backend))
                mod._setup_context(ctx, (src, index, inverse, backend), got)
                grad, *rest = mod._backward(ctx, torch.ones_like(got))
                like(grad, src, "the copy's gradient")
                assert rest == [None, None, None]
        ids = torch.randint(0, 9, (2, 6), device="cuda")
        assert ops.unpad(ids, p).shape == (7,)
        assert ops.pad(ops.unpad(ids, p), p).shape == (2, 6)
        with pytest.raises(SYNC_ERRORS):  # reads T and max_seqlen: documented, once per batch
            ops.packing(torch.ones(2, 6, device="cuda", dtype=torch.int64))


def test_unpad_rows_runs_the_backends_row_copy():
    """Every backend's ``unpad_rows`` body: the row-copy kernel op of that backend (fake kernels)."""
    mod = _module("unpad")
    kernels = {"cuda": "gather_masked_bwd", "triton": "gather_masked_bwd_triton"}
    with FakeTensorMode():
        for backend, kernel in kernels.items():
            if _skip_reason(backend):
                continue
            with Record() as rec, torch.no_grad():
                got = mod.unpad_rows._init_fn(
                    fake_cuda(12, 5),
                    torch.zeros(7, dtype=torch.int64, device="cuda"),
                    torch.zeros(12, dtype=torch.int64, device="cuda"),
                    backend,
                )
            assert got.shape == (7, 5) and [c[0].name() for c in rec.calls] == [f"fastbert::{kernel}"]


def test_modules_on_fake_cuda():
    """The nn wrappers (training mode: dropout drawn on the device) pass through without a host read."""
    if _skip_reason("cuda") and _skip_reason("triton"):
        pytest.skip("no GPU backend to check")
    with FakeTensorMode():
        x = fake_cuda(2, 3, 8, dtype=torch.float16)
        assert nn.FusedBiasGELU(8, device="cuda")(x).shape == x.shape
        ln = nn.FusedLayerNormResidual(8, p=0.1, device="cuda").train()
        assert ln(x, x, fake_cuda(8)).dtype == torch.float16
        sm = nn.FusedMaskedSoftmax(0.5, p=0.1).train()
        assert sm(fake_cuda(2, 2, 3, 3), torch.ones(2, 3, dtype=torch.bool, device="cuda")).shape == (2, 2, 3, 3)
        lce = nn.FusedLinearCrossEntropy(8, 11, chunk_size=4, device="cuda")
        assert lce(fake_cuda(6, 8, grad=True), torch.randint(0, 11, (6,), device="cuda")).shape == ()


def test_padded_bert_training_forward_reads_nothing_back():
    """A BERT classification training forward (padded path: input checks, fused ops on the cuda
    backend, loss) on fake CUDA tensors: no host read. Regression: the input id range check read
    ``.tolist()`` back on every forward; on CUDA it is now an asynchronous device assert."""
    if _skip_reason("cuda"):
        pytest.skip(_skip_reason("cuda"))
    from fastbert.models import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        unpad=False,
    )
    with FakeTensorMode(), torch.device("cuda"):
        model = BertForSequenceClassification(cfg).train()
        ids = torch.randint(0, 97, (2, 9))
        with Record() as rec:
            out = model(
                ids,
                attention_mask=torch.ones(2, 9, dtype=torch.long),
                token_type_ids=torch.zeros_like(ids),
                labels=torch.randint(0, 2, (2,)),
            )
    assert out.loss.shape == () and out.loss.device.type == "cuda"
    ran = {c[0].name() for c in rec.calls}
    assert {"fastbert::layernorm_residual_fwd", "fastbert::masked_softmax_fwd", "fastbert::bias_gelu_fwd"} <= ran, ran


# ------------------------------------------------------------------------------- cudagraph tags


def _fastbert_ops():
    names = []
    for op in backends.OPS:
        for suffix in ("fwd", "bwd", "fwd_triton", "bwd_triton"):
            if hasattr(torch.ops.fastbert, f"{op}_{suffix}"):
                names.append(f"{op}_{suffix}")
    return names + ["linear_cross_entropy_chunked", "linear_cross_entropy_chunked_bwd", "unpad_rows"]


SYNCING = {"gather_masked_fwd", "gather_masked_fwd_triton"}  # the documented data-dependent gather size


@pytest.mark.skipif(not _library.SYNC_TAGS, reason="this torch has no torch.Tag.cudagraph_unsafe")
def test_exactly_the_syncing_ops_are_cudagraph_unsafe():
    """The ops that read a device value back carry ``cudagraph_unsafe`` (Inductor splits CUDA graphs
    around them); every other op is sync-free (the fake-mode tests above) and untagged."""
    names = _fastbert_ops()
    assert "gather_masked_fwd" in names and "linear_cross_entropy_chunked" in names
    for name in names:
        tags = getattr(torch.ops.fastbert, name).default.tags
        assert (torch.Tag.cudagraph_unsafe in tags) == (name in SYNCING), f"fastbert::{name}: {tags}"


HOST_READ = re.compile(
    r"\.item<|\.item\(\)|\.cpu\(\)|_local_scalar_dense|cudaMemcpy\(|cudaMemcpy2D\(|"
    r"cudaDeviceSynchronize|cudaStreamSynchronize|cudaEventSynchronize"
)


def test_only_the_gather_reads_back_in_the_cuda_sources():
    """Fake tensors cannot see inside the C++ glue of the cuda backend: its sources read a device
    value back to the host only where the gather reads its count."""
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    if not csrc.is_dir():
        pytest.skip("csrc/cuda is not in this checkout")
    found = sorted(
        f"{f.name}: {line.strip()}"
        for f in csrc.iterdir()
        if f.suffix in (".cpp", ".cu", ".h", ".cuh")
        for line in f.read_text().splitlines()
        if HOST_READ.search(line)
    )
    assert found and {f.split(":")[0] for f in found} == {"gather_masked.cpp"}, found
