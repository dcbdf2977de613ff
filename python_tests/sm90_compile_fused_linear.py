"""Ahead-of-time compile of the fused-linear Triton kernels (ops/fused_linear.py) for sm_90, no GPU needed;
run by test_ops_fused_linear_compile.py in a process without TRITON_INTERPRET. One JSON line per variant:
{"kernel", "variant", "registers", "local_bytes", "atomics", "mma"}."""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aem_kernels.ops.fused_linear import triton as fused_linear  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INPUTS = ("x_ptr", "w_ptr", "b_ptr")
_I32 = ("n_rows", "vocab", "hidden", "ignore_index")


def compile_variant(kernel, data_type, constexprs):
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs or name == "num_warps":
            signature[name] = "constexpr"
            continue
        if name in _INPUTS:
            signature[name] = data_type
        elif name == "labels_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name == "temperature":
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if name in _I32 else "i64"
        if name.endswith("_ptr") or name in ("hidden", "vocab", "stride_xn", "stride_wv"):
            attrs[(index,)] = [["tt.divisibility", 16]]   # H = 4096, V = 151936 and their strides
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage, re.S)
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel.__name__, "variant": f"{data_type} {sorted(constexprs.items())}",
            "registers": int(match.group(1)), "local_bytes": int(match.group(2)),
            "atomics": "atom.global" in ptx or "red.global" in ptx, "mma": "mma" in ptx or "wgmma" in ptx}


def variants():
    for data_type, dtype in (("*bf16", "bfloat16"), ("*fp32", "float32")):
        import torch

        cfg = fused_linear.block_config(getattr(torch, dtype))
        tiles = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")}
        common = dict(HAS_BIAS=True, DOT_PRECISION="ieee", **tiles)
        yield fused_linear._fused_linear_fwd_kernel, data_type, dict(common, WITH_ENTROPY=True)
        grads = dict(common, HAS_A=True, HAS_B=True, SPLIT=data_type != "*fp32", BLOCK_H=cfg["BLOCK_H"])
        yield fused_linear._fused_linear_bwd_atomic_kernel, data_type, dict(grads, NEED_DX=True, NEED_DW=True,
                                                                             NEED_DB=True)
        yield fused_linear._fused_linear_bwd_dx_kernel, data_type, grads
        yield fused_linear._fused_linear_bwd_dw_kernel, data_type, dict(grads, NEED_DW=True, NEED_DB=True)


if __name__ == "__main__":
    for kernel, data_type, constexprs in variants():
        print(json.dumps(compile_variant(kernel, data_type, constexprs)), flush=True)
