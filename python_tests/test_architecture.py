"""The layout's promises, checked: ops/ are leaves, production code never imports the oracle, every backend
decision comes from dispatch.py (capabilities, fp64 routing, the reductions' implementation), and asking
which backends exist never warns."""

import ast
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import aem_kernels as ak
from aem_kernels import _cpu, _torch, dispatch, reductions, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aem_kernels"
# what a kernel module must not know about: the loss, the dispatcher, the API, the other backends, the oracle
FORBIDDEN_FOR_OPS = {"aem_kernels." + name for name in
                     ("loss", "dispatch", "api", "modulation", "reference", "_cpu", "_torch", "packing",
                      "reductions", "train", "demo")}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set:
    """Every module (and `from X import name` as X.name) that `source`, the text of `module`, imports."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _hits(found: set, forbidden: set) -> set:
    return {name for name in found if any(name == f or name.startswith(f + ".") for f in forbidden)}


def test_import_walker_sees_every_form():
    """The checker itself: each spelling of a forbidden import is caught (so the tests below can fail)."""
    for source in ("from .. import loss", "from ..dispatch import BackendUnavailableError",
                   "import aem_kernels.reference", "from aem_kernels import _cpu",
                   "def f():\n    from ..api import logprobs_and_entropy\n"):
        assert _hits(imported_modules(source, "aem_kernels.ops.logprobs"), FORBIDDEN_FOR_OPS), source
    assert not _hits(imported_modules("from ..errors import BackendUnavailableError\nfrom . import DTYPES",
                                      "aem_kernels.ops.logprobs"), FORBIDDEN_FOR_OPS)
    assert "aem_kernels.ops.DTYPES" in imported_modules("from . import DTYPES", "aem_kernels.ops", True)


OPS_FILES = sorted((PACKAGE / "ops").glob("*.py"))


@pytest.mark.parametrize("path", OPS_FILES, ids=lambda p: p.name)
def test_ops_modules_are_leaves(path):
    module = _module_name(path)
    if path.name != "__init__.py":
        pytest.importorskip("triton")
    importlib.import_module(module)
    found = imported_modules(path.read_text(), module, path.name == "__init__.py")
    assert not _hits(found, FORBIDDEN_FOR_OPS), f"{path.name} imports {sorted(_hits(found, FORBIDDEN_FOR_OPS))}"


def test_production_code_never_imports_the_reference():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "reference.py":
            continue
        hits = _hits(imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py"),
                     {"aem_kernels.reference"})
        if hits:
            offenders[str(path.relative_to(ROOT))] = sorted(hits)
    assert not offenders, offenders


def test_running_every_backend_leaves_the_reference_unimported():
    code = """
        import sys, torch, aem_kernels as ak
        x = torch.randn(2, 5, 33, requires_grad=True); y = torch.randint(0, 33, (2, 5))
        for backend in ("auto", "cpu", "torch", "triton"):
            lp, h = ak.logprobs_and_entropy(x, y, backend=backend)
            (lp.sum() + h.sum()).backward()
            ak.entropy_from_logits(x.detach().double(), backend="torch" if backend == "triton" else backend)
        tr = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, 3]])
        ak.response_entropy(h, tr, 4); ak.response_surprisal(lp, tr, 4, reduction="sum")
        cfg = ak.AEMConfig(surprisal_source="old", entropy_coef=0.01)
        for backend, single in (("auto", False), ("torch", False), ("triton", True)):
            loss, _ = ak.aem_policy_loss(x, y, torch.randn(4), token_response=tr, response_group=torch.tensor([0, 0, 1, 1]),
                                         old_entropy=torch.rand(2, 5), config=cfg, backend=backend, single_pass=single)
            loss.backward()
        assert "aem_kernels.reference" not in sys.modules, "production code imported the oracle"
        print("ok")
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


# ---- dispatch: capabilities, fp64 routing, warnings -----------------------------------------------------

def test_auto_routes_by_dtype_and_device_without_tensors():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dispatch.resolve_backend("auto", cuda, torch.float64).name == "torch"  # fp32-math kernels: not fp64
    if dispatch._TRITON_FOUND:
        assert dispatch.resolve_backend("auto", cuda, torch.bfloat16).name == "triton"
        assert dispatch.resolve_backend("triton", cuda, torch.float32).single_pass_loss is not None
    if (capability.cpu_extension() is not None):
        assert dispatch.resolve_backend("auto", cpu, torch.float64).name == "cpu"   # C++ computes fp64 in fp64
    assert dispatch.resolve_backend("auto", torch.device("meta"), torch.float32).name == "torch"
    assert dispatch.resolve_backend("torch", cuda, torch.float64).single_pass_loss is None
    with pytest.raises(ak.BackendUnavailableError, match="fp32.*fp64.*auto"):
        dispatch.resolve_backend("triton", cuda, torch.float64)
    with pytest.raises(ak.BackendUnavailableError, match="CPU tensors"):
        dispatch.resolve_backend("cpu", cuda, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("gpu", cpu)
    assert ak.BackendUnavailableError is ak.BackendUnavailableError
    assert issubclass(ak.BackendUnavailableError, RuntimeError)


def test_available_backends_never_warns_and_auto_warns_once_on_fallback(monkeypatch):
    monkeypatch.setattr(_cpu, "_IMPORT_ERROR", "the extension is pretend-missing")
    monkeypatch.setattr(dispatch, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for _ in range(2):
            reasons = ak.available_backends("cpu")
            ak.available_backends("cpu", torch.float64)
        assert reasons["cpu"] == "the extension is pretend-missing" and reasons["torch"] is None
        # the named backend raises (never a warning), with the reason
        with pytest.raises(ak.BackendUnavailableError, match="pretend-missing"):
            ak.entropy_from_logits(torch.randn(3, 7), backend="cpu")
    x, y = torch.randn(4, 9), torch.randint(0, 9, (4,))
    with pytest.warns(RuntimeWarning, match='"auto" uses the torch backend for cpu tensors: the extension') as rec:
        lp, h = ak.logprobs_and_entropy(x, y)
        ak.entropy_from_logits(x)
        ak.logprobs_from_logits(x.double(), y)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    expected = ak.logprobs_and_entropy(x, y, backend="torch")
    assert torch.equal(lp, expected[0]) and torch.equal(h, expected[1])


def test_triton_capabilities_are_declared_without_importing_triton():
    code = """
        import sys, torch, aem_kernels as ak
        reasons = ak.available_backends("cpu", torch.float64)
        assert "fp64" in reasons["triton"], reasons
        assert "triton" not in sys.modules, "asking for capabilities imported Triton"
        print("ok")
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- reductions ------------------------------------------------------------------------------------------

def test_segment_sum_implementation_per_device(monkeypatch):
    if (capability.cpu_extension() is not None):
        assert dispatch.resolve_segment_sum(torch.device("cpu")) is _cpu.segment_sum
    if dispatch._TRITON_FOUND:
        from aem_kernels.ops import segment

        assert dispatch.resolve_segment_sum(torch.device("cuda")) is segment.segment_sum
    assert dispatch.resolve_segment_sum(torch.device("meta")) is _torch.segment_sum
    monkeypatch.setattr(_cpu, "_EXTENSION", None)
    assert dispatch.resolve_segment_sum(torch.device("cpu")) is _torch.segment_sum


@pytest.mark.parametrize("with_extension", [True, False])
def test_production_reductions_match_the_reference(monkeypatch, with_extension):
    if not with_extension:
        monkeypatch.setattr(_cpu, "_EXTENSION", None)
    elif not (capability.cpu_extension() is not None):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, 37, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 6, (2, 37), generator=g)
    ids[ids == 4] = 5  # segment 4 is empty: sum 0, mean 0
    torch.testing.assert_close(reductions.segment_sum(values, ids, 7), reference.segment_sum(values, ids, 7),
                               rtol=0, atol=1e-12)
    assert torch.equal(reductions.segment_count(ids, 7), reference.segment_count(ids, 7))
    mean = reductions.segment_mean(values, ids, 7)
    torch.testing.assert_close(mean, reference.segment_mean(values, ids, 7), rtol=0, atol=1e-12)
    assert mean[4] == 0 and mean[6] == 0
    mean.sum().backward()
    counts = reference.segment_count(ids, 7).clamp(min=1).double()
    expected = torch.where(ids >= 0, 1.0 / counts[ids.clamp(min=0)], 0.0)
    torch.testing.assert_close(values.grad, expected, rtol=0, atol=1e-15)
    assert reductions.segment_sum(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def _triton_segment():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU tensors")
    from aem_kernels.ops import segment

    return segment


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_segment_sum_matches_fp64_and_is_deterministic(dtype):
    segment = _triton_segment()
    g = torch.Generator().manual_seed(5)
    n, responses = 517, 9                       # > 4 chunks of BLOCK_N for the big segments
    values = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(-1, responses, (n,), generator=g)
    ids[ids == 2] = -1                          # an empty segment
    out = segment.segment_sum(values, ids, responses)
    assert out.dtype == dtype and out.shape == (responses,)
    exact = reference.segment_sum(values.double(), ids, responses)
    assert out[2] == 0
    # fp32 accumulation (fp64 for fp64), rounded once to the values' dtype: within half an ulp of the result
    # plus the fp32 rounding of n additions
    ulp = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8}[dtype]
    acc = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    bound = ulp * exact.abs() + n * acc * values.double().abs().sum()
    assert ((out.double() - exact).abs() <= bound).all(), (out.double() - exact).abs().max()
    for _ in range(2):
        assert torch.equal(segment.segment_sum(values, ids, responses), out)
    assert segment.segment_sum(values, torch.full((n,), -1), 3).tolist() == [0, 0, 0]
    assert segment.segment_sum(values[:0], ids[:0], 2).tolist() == [0, 0]
    assert segment.segment_sum(values, ids.clamp(max=-1), 0).shape == (0,)


def test_triton_segment_sum_gradient_and_registration():
    segment = _triton_segment()
    g = torch.Generator().manual_seed(6)
    values = torch.randn(2, 23, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 5, (2, 23), generator=g)
    assert torch.autograd.gradcheck(lambda v: segment.segment_sum(v, ids, 5), (values,))
    torch.library.opcheck(torch.ops.aem_kernels.triton_segment_sum.default,
                          (values.detach().float().requires_grad_(), ids, 5))


# ---- validation in one place -----------------------------------------------------------------------------

def test_config_backend_and_mask_checks_name_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.AEMLoss(backend="gpu")
    with pytest.raises(TypeError, match="config must be an AEMConfig, got dict"):
        ak.AEMLoss(config={"beta": 1.0})
    with pytest.raises(TypeError, match="config must be an AEMConfig"):
        ak.modulate_advantages(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.long), config=None)
    with pytest.raises(TypeError, match="config must be an AEMConfig"):
        ak.aem_weights(torch.ones(2), torch.zeros(2, dtype=torch.long), "paper", num_groups=1)
    with pytest.raises(ValueError, match="response_valid must be a bool tensor of shape \\(2,\\)"):
        ak.modulate_advantages(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.long),
                               response_valid=torch.ones(2))
    logits, labels = torch.randn(2, 4, 11), torch.randint(0, 11, (2, 4))
    common = dict(response_group=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.full((2, 4), 0.5), **common)
    with pytest.raises(ValueError, match="response_mask must have shape \\(2, 4\\)"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 3), **common)
    with pytest.raises(TypeError, match="single_pass must be None or a bool, got int"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 4), single_pass=1, **common)
    with pytest.raises(ValueError, match="advantage_level must be one of"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 4), advantage_level="x",
                           **common)
    loss, _ = ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 4, dtype=torch.int64),
                                 **common)  # 0/1 integer masks (as verl passes them) are accepted
    assert torch.isfinite(loss)


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _declared_all(path: pathlib.Path) -> list:
    """`__all__` of a module, read from its source (the integrations import their frameworks)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no __all__")


@pytest.mark.parametrize("module", ["__init__.py", "distributed.py", "integrations/__init__.py",
                                    "integrations/verl.py", "integrations/trl.py"])
def test_readme_api_table_lists_every_public_name(module):
    api = _readme_section("API")
    missing = [name for name in _declared_all(PACKAGE / module)
               if not any(f"`{prefix}{name}" in api for prefix in ("", "aem_kernels.distributed.",
                                                                  "aem_kernels.integrations.",
                                                                  "aem_kernels.integrations.trl."))
               and f" `{name}`" not in api and f"`{name}(" not in api and f"`{name}`" not in api]
    assert not missing, f"README API table lacks {missing} of {module}"


def test_readme_layout_names_every_module():
    layout = _readme_section("Layout")
    names = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    names += [p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [p.name for p in (PACKAGE / "ops").glob("*.py") if p.name != "__init__.py"]
    missing = [name for name in sorted(names) if f"`{name}" not in layout and f"{name}`" not in layout]
    assert not missing, f"README Layout section lacks {missing}"
