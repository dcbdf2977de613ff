"""Smoke test of the benchmark runner (bench/), so that it never rots: the quick profile on tiny shapes in a
temporary folder, checking the outputs' schema and completeness, never the timings. Also the parts whose
failure would silently corrupt published numbers: the correctness gate and the CPU peak-memory probe."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # bench/ sits next to the package and is not installed with it
    sys.path.insert(0, str(ROOT))

from bench import checks, measure, report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.runner import STATUSES  # noqa: E402

# lines that run on any machine: their check against the reference must pass here
ALWAYS_RUN = ("aem_kernels[torch]", "eager", "trl", "verl")
ALWAYS_RUN_HIDDEN = ("fused[torch]", "eager-linear", "trl-chunked-linear")   # in the hidden-state cases


@pytest.fixture
def one_thread():
    # the runner's --threads changes torch's global setting; give it back to the rest of the suite
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_profile_writes_complete_results(tmp_path, one_thread, capsys):
    ns, vocab, dtypes = (16, 32), 384, ("float32", "bfloat16")
    doc = main(["--profile", "quick", "--out", str(tmp_path), "--n", ",".join(map(str, ns)), "--v", str(vocab),
                "--dtype", ",".join(dtypes), "--seq-len", "8", "--reps", "1", "--warmup", "0", "--threads", "1",
                "--device", "cpu"])
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["results"] == json.loads(json.dumps(doc["results"]))
    for key in report.REQUIRED_KEYS:
        assert key in saved, key
    assert saved["schema_version"] == report.SCHEMA_VERSION
    assert saved["environment"]["device"] == "cpu" and saved["environment"]["torch"] == torch.__version__

    lines = [impl["name"] for impl in saved["implementations"]]
    assert set(ALWAYS_RUN) | {"torch.compile", "liger", "cut-cross-entropy"} <= set(lines)
    assert any(name.startswith("aem_kernels[cpu]") for name in lines)
    cases = [case["name"] for case in saved["cases"]]
    assert cases == ["logprobs_fwd", "logprobs_fwd_bwd", "aem_loss_fwd_bwd", "fused_linear_fwd_bwd",
                     "fused_linear_logprob_fwd_bwd"]

    # exactly one record for every case x point x line, ok with full statistics or not-ok with a reason
    seen = {}
    for r in saved["results"]:
        key = (r["case"], r["n"], r["v"], r["dtype"], r["impl"])
        assert key not in seen, f"duplicate record {key}"
        seen[key] = r
        assert r["status"] in STATUSES
        # on the CPU every line that runs must agree with the reference and finish (incl. backends merged later)
        assert r["status"] in ("ok", "skipped"), f"{key}: {r['status']}: {r['reason']}"
        if r["status"] == "ok":
            t = r["time_s"]
            assert t["n"] == len(t["samples"]) >= 1 and t["min"] <= t["median"] <= t["max"] and t["min"] > 0
            assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
            assert r["achieved_gbs"] > 0 and r["roofline_gbs"] > 0 and r["pct_roofline"] > 0
            assert r["check"] and all(info["passed"] for info in r["check"].values())
        else:
            assert isinstance(r["reason"], str) and r["reason"], f"{key} is {r['status']} without a reason"
    expected = {(c, n, vocab, dt, line) for c in cases for n in ns for dt in dtypes for line in lines}
    assert set(seen) == expected

    for (case, n, v, dt, line), r in seen.items():
        hidden_case = case.startswith("fused_linear")
        if (line in ALWAYS_RUN and not hidden_case) or (hidden_case and line in ALWAYS_RUN_HIDDEN):
            assert r["status"] == "ok", f"{line} in {case} at N={n} {dt}: {r['status']}: {r['reason']}"
        if line in ("torch.compile", "liger", "cut-cross-entropy") or line.startswith("aem_kernels[triton]"):
            assert r["status"] == "skipped"
    # the in-place variant only differs when a backward runs
    assert seen[("logprobs_fwd", 16, vocab, "float32", "aem_kernels[torch]+inplace")]["status"] == "skipped"
    assert seen[("logprobs_fwd_bwd", 16, vocab, "float32", "aem_kernels[torch]+inplace")]["status"] == "ok"

    markdown = (tmp_path / "quick.md").read_text()
    assert "quick profile: a smoke run" in markdown and "aem_kernels[torch]" in markdown
    plots = sorted(p.name for p in tmp_path.glob("quick_*.png"))
    assert len(plots) == len(cases) * len(dtypes)   # one N sweep per dtype and case
    table = report.summary_table(saved)
    assert all(line in table for line in lines)   # a row for each line that ran, a reason for the others


def test_correctness_gate_rejects_a_wrong_line():
    ref = {"logprobs": torch.tensor([-3.0, -1.5]), "entropy": torch.tensor([2.0, 0.5]),
           "grad_logits": torch.tensor([[0.1, -0.1], [0.2, -0.2]])}
    ok, _ = checks.compare({k: v.clone() for k, v in ref.items()}, ref)
    assert ok
    wrong_logprob = dict(ref, logprobs=ref["logprobs"] + 0.05)      # beyond fp32's atol 1e-2
    assert not checks.compare(wrong_logprob, ref)[0]
    wrong_sign = dict(ref, grad_logits=-ref["grad_logits"])
    ok, report_ = checks.compare(wrong_sign, ref)
    assert not ok and report_["grad_logits"]["rel_error"] == pytest.approx(2.0)
    # a bf16 line is held to bf16's tolerance: 0.05 passes there, a 1-nat error does not
    bf16 = {k: (v + 0.05).bfloat16() if k != "grad_logits" else v.bfloat16() for k, v in ref.items()}
    assert checks.compare(bf16, ref)[0]
    assert not checks.compare(dict(bf16, entropy=(ref["entropy"] + 1.0).bfloat16()), ref)[0]
    assert not checks.compare(dict(ref, entropy=torch.tensor([float("nan"), 0.5])), ref)[0]
    assert not checks.compare({"logprobs": ref["logprobs"][:1]}, {"logprobs": ref["logprobs"]})[0]


def test_cpu_peak_memory_probe_counts_tensor_bytes():
    keep = torch.ones(1 << 18)   # allocated before: not counted

    def work():
        a = torch.empty(1 << 20)            # 4 MiB
        b = torch.empty(1 << 19)            # 2 MiB, while a is alive: peak 6 MiB
        del a, b
        c = torch.empty(1 << 20)            # 4 MiB after both were freed
        return c.sum() + keep.sum()

    out, peak = measure.peak_memory(torch.device("cpu"), work)
    assert out is not None
    assert 6 << 20 <= peak < (6 << 20) + (1 << 16)
