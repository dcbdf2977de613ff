"""Shared test setup. Triton kernels run on CPU tensors in Triton's interpreter when no GPU is present; the
variable must be set before triton.jit decorates the kernels, i.e. before aem_kernels.ops is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches outlive a change of a custom op's output shapes (an upgraded package), so a
# stale entry from an earlier version could fail the compile tests; each test session gets its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="aem_kernels_inductor_")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


DISTRIBUTED_TESTS = "python_tests/distributed/"


@pytest.hookimpl(optionalhook=True)  # (a pytest-xdist hook)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite in two pytest-xdist workers with --dist loadfile: a test file stays on one
    worker, so its module-scoped fixtures (the sm_90 compiles) run once. The files under distributed/ form one
    unit too: one spawn of gloo processes per world size serves all of them (distributed_harness.py), and a
    second worker would repeat it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return DISTRIBUTED_TESTS if path.startswith(DISTRIBUTED_TESTS) else path

    return FileScheduling(config, log)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
