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
                     "fused_linear_logprob_fwd_bwd", "fused_linear_loss_fwd_bwd"]

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


def test_cpu_kernel_profile_interleaves_and_splits_phases(tmp_path, one_thread):
    """`--profile cpu-kernel` at a tiny size: its five lines, forward/backward phases, the memory copy and read
    measured in the same rounds, every other line recorded as not part of the profile."""
    from bench.profiles import CPU_KERNEL_LINES

    doc = main(["--profile", "cpu-kernel", "--out", str(tmp_path), "--n", "16", "--v", "384", "--reps", "2",
                "--threads", "1", "--device", "cpu", "--name", "tiny", "--no-plots", "--note", "smoke"])
    assert (tmp_path / "tiny.json").exists() and (tmp_path / "tiny.md").exists()
    assert doc["settings"]["interleave"] is True and doc["environment"]["note"] == "smoke"
    by_line = {r["impl"]: r for r in doc["results"]}
    assert {r["case"] for r in doc["results"]} == {"logprobs_fwd_bwd"}
    torch_compile_skipped = []
    for name, r in by_line.items():
        if name in CPU_KERNEL_LINES:
            if r["status"] != "ok":   # torch.compile may be unavailable; it must say why
                torch_compile_skipped.append(name)
                assert name == "torch.compile" and r["reason"], r
                continue
            t = r["time_s"]
            assert t["n"] == 2 and set(t["phases"]) == {"forward", "backward"}
            for phase in t["phases"].values():
                assert phase["n"] == 2 and 0 < phase["median"] <= t["max"]
            assert r["check"] and all(info["passed"] for info in r["check"].values())
            assert r["roofline_source"].startswith("measured copy_") and "interleaved" in r["roofline_source"]
        else:
            assert r["status"] == "skipped" and r["reason"], r
    assert by_line["aem_kernels[torch]"]["reason"] == "not one of the cpu-kernel profile's lines"
    assert by_line["aem_kernels[cpu]+inplace"]["peak_bytes"] < 16 * 384 * 4   # no N x V buffer in place
    (bandwidth,) = doc["bandwidth"]
    assert bandwidth["copy_gbs"] > 0 and bandwidth["read_gbs"] > 0 and bandwidth["copy_time_s"]["n"] == 2
    assert "interleaved" in bandwidth["how"]
    markdown = (tmp_path / "tiny.md").read_text()
    assert "Forward and backward apart" in markdown and "Memory bandwidth" in markdown


def test_precision_profile_reports_errors_against_fp64(tmp_path, one_thread):
    """`--profile precision` at a tiny size: untimed records holding each line's error against fp64; our
    backends (Triton in the interpreter included) within the accuracy rule's reach of eager fp32, the
    formulas in the logits' dtype orders of magnitude worse."""
    doc = main(["--profile", "precision", "--out", str(tmp_path), "--n", "24", "--v", "384", "--threads", "1",
                "--device", "cpu", "--no-plots"])
    records = {(r["impl"], r["dtype"]): r for r in doc["results"]}
    assert {dt for _, dt in records} == {"bfloat16", "float16"}
    for dtype in ("bfloat16", "float16"):
        eager = records[("eager", dtype)]["check"]
        for line in ("aem_kernels[torch]", "aem_kernels[cpu]", "aem_kernels[triton]"):
            r = records[(line, dtype)]
            assert r["status"] == "ok" and "time_s" not in r, r
            for output in ("logprobs", "entropy"):
                assert r["check"][output]["max_abs_error"] <= 3 * eager[output]["max_abs_error"] + 1e-5
        verl = records[("verl", dtype)]["check"]
        assert verl["logprobs"]["max_abs_error"] > 100 * eager["logprobs"]["max_abs_error"]
    assert records[("aem_kernels[cpu]+inplace", "bfloat16")]["status"] == "skipped"
    assert "max abs error against fp64" in (tmp_path / "precision.md").read_text()


def test_timer_interleaves_rounds_and_reports_failures():
    calls = []

    def failing(_):
        raise RuntimeError("boom")

    entries = {"a": (lambda: None, lambda _: calls.append("a")), "b": (lambda: None, lambda _: calls.append("b")),
               "bad": (lambda: None, failing)}
    results = measure.Timer(torch.device("cpu")).run_interleaved(
        entries, measure.TimingPolicy(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0, interleave=True))
    assert calls == ["a", "b"] * 4       # one warm-up round, then three rounds, alternating
    assert results["a"]["n"] == results["b"]["n"] == 3 and "phases" not in results["a"]
    assert isinstance(results["bad"], RuntimeError)


def test_phase_marks_outside_a_timed_call_do_nothing():
    measure.phase_end("forward")   # not inside Timer.sample: no error, no effect
    total, phases = measure.Timer(torch.device("cpu")).sample(
        lambda _: (measure.phase_end("forward"), measure.phase_end("backward")), None)
    assert set(phases) == {"forward", "backward"} and total >= sum(phases.values())


def test_a_new_case_is_one_module_and_one_registration(monkeypatch, one_thread):
    """What the fused-linear case will do: a case over hidden states that brings its own lines and reference,
    registered by one entry in CASES; the logits lines are recorded as not applicable there."""
    from bench import cases as cases_module
    from bench.cases import Case, Inputs
    from bench.lines import Implementation
    from bench.profiles import Profile, Sweep
    from bench.measure import TimingPolicy
    from bench.runner import BenchContext, run_profile

    def eager(hidden, weight, labels):
        log_p = torch.log_softmax(hidden @ weight.T, dim=-1)
        return log_p.gather(-1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)

    def chunked(hidden, weight, labels):
        parts = [eager(h, weight, y) for h, y in zip(hidden.split(8), labels.split(8))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    lines = {"toy-eager": Implementation("toy-eager", "eager over hidden", eager, input_kind="hidden"),
             "toy-chunked": Implementation("toy-chunked", "8-row chunks", chunked, input_kind="hidden")}

    class ToyFusedLinear(Case):
        name, title, input_kind, shared_logits, backward = "toy_fused_linear", "toy", "hidden", False, True

        def traffic_bytes(self, point):
            return point.n * point.v * 4

        def lines(self, device):
            return list(lines.values())

        def reference_for(self, default):
            return lines["toy-eager"]

        def extend(self, base, point, device, seed):
            assert base is None
            gen = torch.Generator().manual_seed(seed)
            return Inputs(logits=torch.randn(point.n, 16, generator=gen),   # hidden [N, H]
                          labels=torch.randint(0, point.v, (point.n,), generator=gen),
                          extra={"weight": torch.randn(point.v, 16, generator=gen)})

        def call(self, impl, inputs):
            lp, ent = impl.fn(inputs.logits, inputs.extra["weight"], inputs.labels)
            (grad,) = torch.autograd.grad((lp * 1.5).sum() + ent.sum(), inputs.logits)
            return {"logprobs": lp.detach(), "entropy": ent.detach(), "grad_hidden": grad}

    monkeypatch.setitem(cases_module.CASES, "toy_fused_linear", ToyFusedLinear())   # the registration line
    from bench.__main__ import select_lines
    from bench.implementations import reference_implementation

    profile = Profile(name="toy", description="", sweeps=[Sweep("s", ((24, 40, "float32"),))],
                      timing=TimingPolicy(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0),
                      seq_len=24, cases=["toy_fused_linear", "logprobs_fwd"], exclude={"torch.compile": "slow"})
    all_lines, excluded = select_lines(profile, torch.device("cpu"), None, [])
    logged = []
    records = run_profile(BenchContext(device=torch.device("cpu"), profile=profile, lines=all_lines,
                                       reference=reference_implementation(all_lines), excluded=excluded,
                                       log=logged.append))
    by_key = {(r["case"], r["impl"]): r for r in records}
    chunked = by_key[("toy_fused_linear", "toy-chunked")]
    assert chunked["status"] == "ok" and chunked["check"]["grad_hidden"]["rel_error"] < 1e-5   # a gradient check
    assert by_key[("toy_fused_linear", "toy-eager")]["status"] == "ok"
    assert "takes logits as input" in by_key[("toy_fused_linear", "eager")]["reason"]
    assert "takes hidden as input" in by_key[("logprobs_fwd", "toy-chunked")]["reason"]
    assert by_key[("logprobs_fwd", "eager")]["status"] == "ok"
    assert logged and all("[N=24 V=40 float32]" in msg or "skipped" in msg for msg in logged)


def test_loss_mode_cases_check_ours_against_each_frameworks_loss(tmp_path, one_thread):
    """`aem_loss_fwd_bwd[<mode>]` for a verl mode (gspo: a sequence ratio, two passes) and a TRL type (dr_grpo:
    its normaliser through loss_scale_factor) at a tiny shape: ours and eager (the framework's own loss on
    materialised log-probs) agree on the loss and the logits' gradient and are timed, the mode-independent lines
    are left out with the reason, and the report gathers the modes in one table. The cpu profile runs the 18
    modes at one point only, which a grid given on the command line replaces."""
    from bench.cases import LOSS_MODE_CASES
    from bench.profiles import LOSS_MODE_POINT, get_profile, override

    cases = ["aem_loss_fwd_bwd[gspo]", "aem_loss_fwd_bwd[dr_grpo]"]
    doc = main(["--profile", "quick", "--cases", ",".join(cases), "--out", str(tmp_path), "--n", "32", "--v", "256",
                "--dtype", "float32", "--seq-len", "4", "--reps", "1", "--warmup", "0", "--threads", "1",
                "--device", "cpu", "--no-plots"])
    by_key = {(r["case"], r["impl"]): r for r in doc["results"]}
    for case in cases:
        for line in ("aem_kernels[torch]", "aem_kernels[cpu]", "eager"):
            r = by_key[(case, line)]
            assert r["status"] == "ok" and r["time_s"]["n"] == 1, r
            assert r["check"]["loss"]["rel_error"] < 1e-5 and r["check"]["grad_logits"]["rel_error"] < 1e-5, r
        for line in ("trl", "verl", "aem_kernels[cpu]+inplace"):
            assert by_key[(case, line)]["status"] == "skipped"
            assert "does not depend on the loss mode" in by_key[(case, line)]["reason"]
    markdown = (tmp_path / "quick.md").read_text()
    assert "## The loss modes at N=32 V=256 float32" in markdown
    assert "| gspo | " in markdown and "| dr_grpo | " in markdown

    cpu = get_profile("cpu", "cpu")
    assert set(LOSS_MODE_CASES) <= set(cpu.cases) and len(LOSS_MODE_CASES) == 18
    assert all(cpu.runs_at(case, LOSS_MODE_POINT) and not cpu.runs_at(case, (128, 151936, "float32"))
               for case in LOSS_MODE_CASES)
    assert override(cpu, ns=[64]).runs_at(LOSS_MODE_CASES[0], (64, 32000, "float32"))
