"""The Triton dropout mask (``philox_keep``) is the shared Philox4x32-10 stream of fastbert/philox.py
bit for bit, on every triton: counters whose high 32-bit word is non-zero included, and also when
``tl.randint4x`` runs int64 counters as 64-bit Philox (triton < 3.4), which the kernels must not use."""

import pytest
import torch

from fastbert import philox
from fastbert import triton as fb_triton
from tests.utils import TRITON_INTERPRET

pytestmark = pytest.mark.skipif(
    not (fb_triton.available and TRITON_INTERPRET),
    reason=f"needs the Triton interpreter ({fb_triton.error or 'TRITON_INTERPRET unset'})",
)

if fb_triton.available:
    import triton
    import triton.language as tl

    from fastbert.triton._common import philox_keep

    @triton.jit
    def _keep_kernel(
        seed_ptr, out_ptr, row0, col0, n, threshold, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        r64 = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        keep = philox_keep(seed_ptr, r64, col0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(out_ptr + offs, keep.to(tl.int8))

    @triton.jit
    def _randint4x_before_3_4(seed, offset, n_rounds: tl.constexpr = 10):
        """triton 3.0-3.3's ``tl.randint4x``: the offset's own width picks the Philox variant."""
        _0 = offset * 0
        return tl.philox(seed, offset, _0, _0, _0, n_rounds)


def _expected(seed, row0, rows, n, p, col0=0, block_n=None):
    """Keep mask of rows ``row0 .. row0 + rows - 1``, columns ``col0 .. col0 + block_n - 1`` (default:
    the whole row) of a [.., n] tensor, from fastbert/philox.py."""
    cols = torch.arange(col0, col0 + (block_n or n), dtype=torch.int64)
    e = (torch.arange(rows, dtype=torch.int64)[:, None] + row0) * n + cols
    outs = philox.philox4x32(seed, (e >> 6) * 16 + (e & 15))
    which = (e >> 4) & 3
    r = torch.zeros_like(e)
    for i, o in enumerate(outs):
        r = torch.where(which == i, o, r)
    return (r >> 8) >= philox.threshold(p)


def _keep(seed, row0, rows, n, p, grouped, col0=0, block_n=None):
    out = torch.empty(rows, block_n or n, dtype=torch.int8)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    _keep_kernel[(1,)](
        seed_t, out, row0, col0, n, philox.threshold(p), GROUPED=grouped, BLOCK_M=rows, BLOCK_N=block_n or n
    )
    return out.bool()


# row0 = 2**30 with n = 64: elements near 2**36, counters near 2**34 (high word 4)
@pytest.mark.parametrize("row0", [0, 12345, 2**30])
@pytest.mark.parametrize("grouped", [False, True])
def test_philox_keep_matches_stream(row0, grouped):
    seed = 0x2F1E_D3C4_B5A6_9788 & (philox.SEED_HIGH - 1)  # both key words non-zero
    got = _keep(seed, row0, 4, 64, 0.5, grouped)
    want = _expected(seed, row0, 4, 64, 0.5)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} mask bits differ"


@pytest.mark.parametrize("grouped", [False, True])
def test_philox_keep_independent_of_randint4x(monkeypatch, grouped):
    """With triton < 3.4's ``tl.randint4x`` in place, the mask is still the shared stream."""
    monkeypatch.setattr(tl, "randint4x", _randint4x_before_3_4)
    seed = 987654321987
    assert torch.equal(_keep(seed, 7, 4, 64, 0.25, grouped), _expected(seed, 7, 4, 64, 0.25))


# Rows whose length is not a multiple of 64 start at every phase of the 64-element groups: BLOCK_N a
# multiple of 64 takes the paired mode (two counters per 4 elements), under 64 one per element.
@pytest.mark.parametrize(
    "n, col0, block_n", [(100, 0, 128), (100, 64, 64), (771, 640, 128), (77, 0, 128), (20, 0, 32), (3, 0, 16)]
)
@pytest.mark.parametrize("row0", [0, 2**29 + 3])
def test_philox_keep_any_row_length(n, col0, block_n, row0):
    seed = 0x1234_5678_9ABC & (philox.SEED_HIGH - 1)
    got = _keep(seed, row0, 8, n, 0.3, False, col0=col0, block_n=block_n)
    want = _expected(seed, row0, 8, n, 0.3, col0=col0, block_n=block_n)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} mask bits differ"
