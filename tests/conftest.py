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
    prev = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
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


# ---------------------------------------------------------------- Triton launch recording
# Every fastbert Triton launch of the session is recorded as the specialisation a CUDA launch would
# compile (tests/triton_launches.py); tests/test_triton_aot.py, moved last, compiles them for sm_80
# and sm_90. FASTBERT_RECORD_LAUNCHES=<file> also writes them to a JSON file at the end.


def pytest_sessionstart(session):
    from tests import triton_launches

    triton_launches.install()


def pytest_collection_modifyitems(session, config, items):
    aot = [i for i in items if i.nodeid.split("::")[0].endswith("test_triton_aot.py")]
    if aot:
        moved = set(map(id, aot))
        items[:] = [i for i in items if id(i) not in moved] + aot


def pytest_sessionfinish(session, exitstatus):
    from tests import triton_launches

    path = os.environ.get("FASTBERT_RECORD_LAUNCHES")
    if path:
        triton_launches.dump(path)
    triton_launches.uninstall()
