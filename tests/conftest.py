"""Test set-up. Triton's interpreter must be chosen before triton is imported: without a GPU, the
triton backend's tests run its kernels on CPU tensors under TRITON_INTERPRET=1."""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import fastbert  # noqa: E402


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed (FASTBERT_TEST_SEED=<n>)."""
    s = int(os.environ.get("FASTBERT_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture
def poison():
    """Uninitialised outputs are filled with NaN, so a kernel that skips an element fails."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0])
    torch.utils.deterministic.fill_uninitialized_memory = prev[1]


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts (and ends) with automatic backend choice and the best CPU ISA."""
    yield
    if fastbert._ext.C is not None:
        fastbert._ext.C.set_cpu_isa("auto")
