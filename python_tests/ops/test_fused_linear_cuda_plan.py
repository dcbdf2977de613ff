"""The fused linear's CUDA plan, tested on CPU: its choices for each device and dtype (with made-up
capabilities), its memory plan (what its products are given: the weight itself, half-precision operands,
chunks of the budget) and its numbers through the same code with the CPU product (`products.emulated_mm`:
exact half x half products, fp32 accumulation), against fp64 under the accuracy rule."""

from __future__ import annotations

import pytest
import torch

import aem_kernels.ops.fused_linear as FL
from aem_kernels.ops.fused_linear import fused_linear_path, plan as P, resolve_fused_linear_path, vocab_parallel
from aem_kernels.ops.fused_linear.products import HalfProducts, emulated_addmm_into, emulated_mm
from fused_linear_checks import assert_rule, check_against_rule, grads, linear_inputs, materialised

CUDA = torch.device("cuda")   # only named: the decision reads the device type, nothing runs on it
HALF = [torch.bfloat16, torch.float16]
TC = "cpu-chunked-tc"


# ---- the decision ----------------------------------------------------------------------------------------------

def test_auto_kind_table():
    for half_mm in (True, False):
        assert P.auto_kind("cuda", torch.float32, half_mm) == "chunked"
        assert P.auto_kind("cuda", torch.float64, half_mm) == "chunked"
        for dtype in HALF:
            assert P.auto_kind("cuda", dtype, half_mm) == ("chunked-tc" if half_mm else "blocked")
            assert P.auto_kind("cpu", dtype, half_mm) == "blocked"
            assert P.chunked_kind("cuda", dtype, half_mm) == ("chunked-tc" if half_mm else "chunked")
            assert P.chunked_kind("cpu", dtype, half_mm) == "chunked"
        assert P.auto_kind("cpu", torch.float32, half_mm) == "chunked"


@pytest.mark.parametrize("half_mm", [True, False])
def test_cuda_tensors_get_the_plan_by_default(monkeypatch, half_mm):
    monkeypatch.setattr(FL, "half_mm_fp32_out", lambda device_type: half_mm and device_type == "cuda")
    keys = {dtype: resolve_fused_linear_path("auto", CUDA, dtype).key for dtype in HALF + [torch.float32,
                                                                                           torch.float64]}
    half = "triton-chunked-tc" if half_mm else "triton-blocked"
    assert keys == {torch.bfloat16: half, torch.float16: half, torch.float32: "triton-chunked",
                    torch.float64: "torch-chunked"}
    # the row backend stays the caller's; the vocab-parallel op takes the same products on its row chunks
    assert resolve_fused_linear_path("torch", CUDA, torch.bfloat16).key == half.replace("triton", "torch")
    vp = resolve_fused_linear_path("auto", CUDA, torch.bfloat16, vocab_parallel=True).key
    assert vp == ("triton-chunked-tc" if half_mm else "triton-chunked")
    assert resolve_fused_linear_path("auto", CUDA, torch.bfloat16, path="tiles").key == "triton"
    assert resolve_fused_linear_path("auto", CUDA, torch.bfloat16, path="blocked").key == "triton-blocked"
    chunked = resolve_fused_linear_path("auto", CUDA, torch.bfloat16, path="chunked").key
    assert chunked == ("triton-chunked-tc" if half_mm else "triton-chunked")
    # CPU tensors keep their paths whatever torch.mm does on CUDA
    assert resolve_fused_linear_path("auto", torch.device("cpu"), torch.bfloat16).key == "cpu-blocked"


def test_default_chunk_is_tensor_core_rows():
    V = 151936
    assert P.chunk_plan(16384, V, torch.bfloat16, None, tensor_cores=True) == P.TENSOR_CORE_ROWS
    assert P.chunk_plan(300, V, torch.bfloat16, None, tensor_cores=True) == 300
    # a budget pays for the fp32 logits and their two half-precision parts: 8 bytes per logit
    assert P.chunk_plan(16384, V, torch.bfloat16, 8 * V * 77, tensor_cores=True) == 77
    assert P.chunk_plan(16384, V, torch.bfloat16, 1, tensor_cores=True) == 1


# ---- the memory plan ---------------------------------------------------------------------------------------------

class Recorder:
    """HalfProducts' products, recorded as (kind, a dtype, b dtype, a shape, b shape, a storage, b storage)."""

    def __init__(self):
        self.calls = []

    def _record(self, kind, a, b):
        self.calls.append((kind, a.dtype, b.dtype, tuple(a.shape), tuple(b.shape), a.untyped_storage().data_ptr(),
                           b.untyped_storage().data_ptr()))

    def mm(self, a, b, out=None):
        self._record("mm", a, b)
        return emulated_mm(a, b, out)

    def accumulate(self, dw, a, b, alpha):
        self._record("addmm", a, b)
        emulated_addmm_into(dw, a, b, alpha)


@pytest.mark.parametrize("in_place", [True, False])
def test_products_get_the_weight_itself_in_half_precision_and_chunks_of_the_budget(monkeypatch, in_place):
    n, hidden, vocab, rows = 45, 24, 301, 8
    x, w, b, labels, ga, gb = linear_inputs(shape=(n,), hidden=hidden, vocab=vocab, dtype=torch.bfloat16,
                                            ignore=(2, 3, 30))
    rec = Recorder()
    monkeypatch.setattr(FL, "half_products",
                        lambda device, dtype: HalfProducts(dtype, rec.mm, rec.accumulate if in_place else None))
    check_against_rule("cpu", x, w, b, labels, ga, gb, key=TC, chunk_budget_bytes=8 * vocab * rows)
    calls = rec.calls
    assert all(c[1] == c[2] == torch.bfloat16 for c in calls)               # never an fp32 operand
    logits = [c for c in calls if c[4] == (hidden, vocab)]                    # x @ W^T
    dx = [c for c in calls if c[4] == (vocab, hidden)]                        # dz part @ W
    dw = [c for c in calls if c[4][1] == hidden and c[4][0] == c[3][1] and c not in dx]   # parts^T @ [x; x]
    assert len(logits) + len(dx) + len(dw) == len(calls)
    # the weight itself (one storage, no copy) in every product with it
    assert len({c[6] for c in logits + dx}) == 1
    # 6 chunks of <= 8 of the 42 active rows, twice (forward, backward); dz @ W as two parts per chunk
    assert [c[3][0] for c in logits] == [8, 8, 8, 8, 8, 2] * 2
    assert [c[3][0] for c in dx] == [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 2, 2]
    # dz^T x: one product per chunk over the two stacked parts (in place), else vocab pieces that fit the
    # chunk's spent logits buffer
    assert all(c[3][1] in (16, 4) for c in dw)
    if in_place:
        assert [c[0] for c in dw] == ["addmm"] * 6 and all(c[3][0] == vocab for c in dw)
    else:
        assert all(c[3][0] * hidden <= c[3][1] // 2 * vocab for c in dw) and len(dw) > 6
    # no operand but the weight holds more than a chunk's two parts: never N x V
    sizes = [c[3][0] * c[3][1] for c in calls] + [c[4][0] * c[4][1] for c in dw]
    assert max(sizes) <= 2 * rows * vocab < n * vocab


def test_the_vocab_parallel_op_takes_the_plan(world_of_one, monkeypatch):
    x, w, b, labels, ga, gb = linear_inputs(shape=(29,), hidden=21, vocab=203, dtype=torch.bfloat16)
    path = fused_linear_path(TC)
    monkeypatch.setattr(vocab_parallel, "resolve_fused_linear_path", lambda *args, **kwargs: path)
    rec = Recorder()
    monkeypatch.setattr(FL, "half_products", lambda device, dtype: HalfProducts(dtype, rec.mm, rec.accumulate))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    lp, ent = vocab_parallel.vocab_parallel_fused_linear_logprobs_and_entropy(
        leaves[0], leaves[1], labels, bias_shard=leaves[2], chunk_budget_bytes=8 * 203 * 10, temperature=0.8)
    ours = grads((lp, ent), leaves, ga, gb)
    assert rec.calls and all(c[1] == c[2] == torch.bfloat16 for c in rec.calls)
    assert sorted({c[3][0] for c in rec.calls if c[4] == (21, 203)}) == [7, 10]   # 29 - 2 ignored rows
    eager = materialised(x, w, b, labels, 0.8, torch.float32)
    truth = materialised(x, w, b, labels, 0.8, torch.float64)
    assert_rule("logprobs", lp, eager[0], truth[0])
    assert_rule("entropy", ent, eager[1], truth[1])
    for name, g, e, t in zip("hwb", ours, grads(eager[:2], eager[2], ga, gb), grads(truth[:2], truth[2], ga, gb)):
        assert_rule(f"grad {name}", g, e.to(torch.bfloat16), t)


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- the numbers: the plan's products on CPU, against fp64 -----------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale, temperature, budget_rows", [(1.0, 0.7, 5), (30.0, 0.3, None), (3000.0, 2.5, 11)])
def test_values_and_gradients_follow_the_rule(dtype, scale, temperature, budget_rows):
    # logits up to ~1e4 at scale 3000; odd sizes; ignored rows; several chunks where a budget is given
    x, w, b, labels, ga, gb = linear_inputs(shape=(3, 19), hidden=37, vocab=683, dtype=dtype, scale=scale,
                                            ignore=(0, 20, 41))
    budget = 8 * 683 * budget_rows if budget_rows else None
    check_against_rule("cpu", x, w, b, labels, ga, gb, temperature=temperature, key=TC, chunk_budget_bytes=budget)


@pytest.mark.parametrize("dtype", HALF)
def test_without_bias_entropy_or_in_place_accumulation(dtype, monkeypatch):
    monkeypatch.setattr(FL, "half_products", lambda device, dt: HalfProducts(dt, emulated_mm, None))
    x, w, _, labels, ga, gb = linear_inputs(shape=(40,), hidden=33, vocab=517, dtype=dtype, bias=False)
    check_against_rule("cpu", x, w, None, labels, ga, gb, temperature=1.3, with_entropy=False, key=TC,
                       chunk_budget_bytes=8 * 517 * 9)


def test_fp16_parts_are_scaled_into_range():
    # an upstream gradient of 1e6 (an fp16 loss scale) overflows fp16 parts unless they are scaled
    products = HalfProducts(torch.float16, emulated_mm)
    dz = torch.tensor([[1e6, -3e-3, 2.0 ** -30], [0.0, 7.0, -1e5]])
    parts = products.parts(dz.clone())
    assert all(torch.isfinite(p).all() for p in parts.parts)
    rebuilt = parts.scale * sum(p.double() for p in parts.parts)
    assert (rebuilt - dz.double()).abs().max() <= 1e6 * 2.0 ** -20


# ---- path "tiles": the Triton tile kernels, autotuned ---------------------------------------------------------

def test_tile_configurations_one_in_the_interpreter_and_pruned_by_dtype():
    tiles = pytest.importorskip("aem_kernels.ops.fused_linear.triton")
    assert len(tiles.interpreter_configs()) == 1   # no benchmarking in the interpreter
    configs = tiles.gpu_configs()
    for dtype, block_k in ((torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 32)):
        kept = tiles.prune_tiles(configs, {"x_ptr": torch.empty(0, dtype=dtype)})
        assert len(kept) == 3 and {c.kwargs["BLOCK_K"] for c in kept} == {block_k}
        # the first is the tile that the sm_90 compile check builds (no spills there)
        assert dict(kept[0].kwargs, num_warps=kept[0].num_warps) == {"BLOCK_N": 64, "BLOCK_V": 128,
                                                                       "BLOCK_K": block_k, "BLOCK_H": 64,
                                                                       "num_warps": 8}


def test_autotuning_trials_leave_the_atomic_gradients_exact(monkeypatch):
    # two configurations, each trial run twice on the real outputs: the atomic backward's outputs must be
    # zeroed before every trial and before the chosen configuration's run, else the gradients come out 3x
    import triton

    tiles = pytest.importorskip("aem_kernels.ops.fused_linear.triton")
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_V": 32, "BLOCK_K": 16, "BLOCK_H": 16}, num_warps=1)
               for n in (16, 32)]
    monkeypatch.setattr(tiles, "prune_tiles", lambda configs, named_args, **kw: configs)
    tuned = tiles.autotuned(tiles._fused_linear_bwd_atomic_kernel, configs, reset=tiles.ATOMIC_OUTPUTS)

    def trial(self, *args, config, **meta):   # the interpreter has no benchmarker: run, and prefer the second
        full = {**self.nargs, **meta, **config.all_kwargs()}
        for _ in range(2):
            self.pre_hook(full)
            self.fn.run(*args, **meta, **config.all_kwargs())
        return [-float(config.kwargs["BLOCK_N"])] * 3

    tuned._bench = trial.__get__(tuned)
    monkeypatch.setattr(tiles, "_bwd_atomic", tuned)
    x, w, b, labels, ga, gb = linear_inputs(shape=(21,), hidden=18, vocab=71, dtype=torch.bfloat16)
    check_against_rule("triton", x, w, b, labels, ga, gb, path="tiles")
    assert tuned.best_config.kwargs["BLOCK_N"] == 32


# ---- on a GPU: the plan itself (cuBLAS), its decision and its numbers at LLM-like shapes ----------------------

@pytest.mark.gpu
def test_gpu_takes_the_plan_and_torch_mm_takes_out_dtype():
    from aem_kernels.capability import half_addmm_accumulates_fp32, half_mm_fp32_out

    assert half_mm_fp32_out("cuda")
    for dtype in HALF:
        assert resolve_fused_linear_path("auto", CUDA, dtype).key == "triton-chunked-tc"
    # which dW accumulation this torch takes (reported by the GPU session; both are tested on CPU)
    print("addmm accumulates in fp32:", half_addmm_accumulates_fp32(CUDA, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("budget_rows", [None, 200])
def test_gpu_plan_follows_the_rule(dtype, budget_rows):
    # check_against_rule runs backend "triton" on CUDA tensors where a GPU is present: path "auto", the plan
    x, w, b, labels, ga, gb = linear_inputs(shape=(3, 333), hidden=520, vocab=5003, dtype=dtype, scale=3.0,
                                            ignore=(0, 500))
    budget = 8 * 5003 * budget_rows if budget_rows else None
    check_against_rule("triton", x, w, b, labels, ga, gb, temperature=0.8, chunk_budget_bytes=budget)
