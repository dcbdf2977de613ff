"""Ahead-of-time compile of every Triton kernel for sm_90 (H100/H200), no GPU needed; run by
test_ops_gpu_compile.py as a script in a process without TRITON_INTERPRET (the interpreter replaces
triton.jit, so the kernels must be imported fresh). Prints one JSON line per kernel variant:
{"kernel", "variant", "registers", "local_bytes", "vector_loads", "vector_stores", "atomics"}.
"""

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
from aem_kernels.ops.logprobs import triton as logprobs  # noqa: E402
from aem_kernels.ops.policy_loss import triton as aem_loss  # noqa: E402
from aem_kernels.ops.segment import triton as segment  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Argument types by name; the logits/gradient pointers get the dtype of the variant.
_TYPES = {"labels_ptr": "*i64", "token_response_ptr": "*i64", "order_ptr": "*i64", "bounds_ptr": "*i64",
          "rows_per_batch": "i32", "vocab": "i32", "ignore_index": "i32", "inv_temperature": "fp32",
          "tau_hi": "fp32", "tau_lo": "fp32", "clip_low": "fp32",
          "clip_high": "fp32", "dual_clip": "fp32", "entropy_coef": "fp32", "kl_coef": "fp32"}
# Triton's launcher marks pointers and integers divisible by 16 (V = 151936, its strides): mirror that here.
_ALIGNED = re.compile(r"_ptr$|^stride|^grad_stride|^vocab$")


def compile_variant(kernel, data_type, constexprs, num_warps=8):
    names = list(kernel.arg_names)
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ("logits_ptr", "grad_ptr"):
            signature[name] = data_type
        else:
            signature[name] = _TYPES.get(name, "*fp32" if name.endswith("_ptr") else "i64")
        if _ALIGNED.search(name):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage, re.S)
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel.__name__, "variant": f"{data_type} {constexprs}", "registers": int(match.group(1)),
            "local_bytes": int(match.group(2)), "vector_loads": "ld.global.v4" in ptx,
            "vector_stores": "st.global.v4" in ptx, "atomics": "atom.global" in ptx or "red.global" in ptx}


def variants():
    for data_type, block in (("*bf16", 8192), ("*fp16", 8192), ("*fp32", 4096)):
        for has_labels in (True, False):
            yield logprobs._logprobs_entropy_fwd_kernel, data_type, dict(HAS_LABELS=has_labels, BLOCK_V=block)
    for data_type, block in (("*bf16", 4096), ("*fp32", 2048)):
        for flags in ((True, True, True), (False, False, True), (True, True, False)):
            yield logprobs._logprobs_entropy_bwd_kernel, data_type, dict(
                zip(("HAS_LABELS", "HAS_GRAD_LOGPROBS", "HAS_GRAD_ENTROPY"), flags), BLOCK_V=block)
    for kl_type in (0, 1, 2, 3):
        yield aem_loss._aem_loss_fused_kernel, "*bf16", dict(
            HAS_OLD=kl_type != 1, DUAL_CLIP=kl_type % 2 == 0, KL_TYPE=kl_type, HAS_ENTROPY_BONUS=kl_type != 2,
            WRITE_GRAD=True, BLOCK_V=8192, GRAD_BLOCK_V=4096)
    yield aem_loss._aem_loss_fused_kernel, "*bf16", dict(
        HAS_OLD=True, DUAL_CLIP=True, KL_TYPE=3, HAS_ENTROPY_BONUS=True, WRITE_GRAD=False, BLOCK_V=8192,
        GRAD_BLOCK_V=4096)
    yield aem_loss._scale_rows_kernel, "*bf16", dict(BLOCK_V=4096)
    for has_second in (True, False):
        yield segment._segment_sum_kernel, "*fp32", dict(HAS_SECOND=has_second, BLOCK_N=128)


if __name__ == "__main__":
    for kernel, data_type, constexprs in variants():
        print(json.dumps(compile_variant(kernel, data_type, constexprs)), flush=True)
