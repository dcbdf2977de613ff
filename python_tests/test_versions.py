"""The supported versions: torch 2.11 to 2.13 and triton 3.6 to 3.9 (pyproject.toml, README "Supported
versions"). The installed torch and triton are inside those ranges, and the second leg of `make test` (the
Triton tests under the oldest supported Triton, from an overlay folder on PYTHONPATH) really imports the Triton
it installed: the Makefile names it in AEM_EXPECT_TRITON, so the leg cannot silently run the newer Triton of
./.venv a second time."""

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_RANGE = ">=2.11,<2.14"
TRITON_RANGE = ">=3.6,<3.10"


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as '2.13.0+cpu' or '3.6.0'."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _inside(version: str, spec: str) -> bool:
    """Whether `version` satisfies a '>=a.b,<c.d' range (the only form pyproject uses here)."""
    low, high = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", spec).groups()
    return _release(low) <= _release(version) < _release(high)


def test_range_check_itself():
    assert _inside("2.11.0+cu130", TORCH_RANGE) and _inside("2.13.0+cpu", TORCH_RANGE)
    assert not _inside("2.10.1", TORCH_RANGE) and not _inside("2.14.0", TORCH_RANGE)
    assert _inside("3.6.0", TRITON_RANGE) and not _inside("3.10.0", TRITON_RANGE)


def test_pyproject_states_the_supported_ranges():
    tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert f"torch{TORCH_RANGE}" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert extras["triton"] == [f"triton{TRITON_RANGE}"]
    assert f"triton{TRITON_RANGE}; platform_system == 'Linux'" in extras["test"]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("### Supported versions", 1)[1].split("\n#", 1)[0]
    assert "torch 2.11 to 2.13" in section and "triton 3.6 to 3.9" in section


def test_installed_torch_and_triton_are_supported():
    assert _inside(torch.__version__, TORCH_RANGE), torch.__version__
    triton = pytest.importorskip("triton")
    assert _inside(triton.__version__, TRITON_RANGE), triton.__version__
    expected = os.environ.get("AEM_EXPECT_TRITON")
    if expected:  # the second leg of `make test`
        assert triton.__version__ == expected, (triton.__version__, triton.__file__)
