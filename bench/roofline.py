"""The roofline of every GPU case: the bytes a line must move, the FLOPs it must do, and the time floor they
set on a device (`python -m bench --roofline`; the GPU profiles print achieved % of the floor per time).

The model (B = bytes per element of the inputs: 2 for bf16/fp16, 4 for fp32; per-token terms - labels, the
N-vectors of log-probs, entropies and their upstream gradients - are O(N) against O(N V) and left out):

  log-probs + entropies, forward         read the logits once                         bytes N V B
  the same, forward + backward           read them in the forward and again in the    bytes 3 N V B
                                         backward, write their gradient once
  AEM policy loss, forward + backward    as the line above (the loss's tail is O(N))  bytes 3 N V B
  the token ops' FLOPs are elementwise (max, exp, a few multiply-adds per logit: ~5 per logit per pass, on the
  CUDA cores, not the tensor cores), so no tensor-core FLOPs enter their floor: they are memory-bound.

  fused linear (hidden [N, H], weight [V, H] -> logits [N, V], never stored), forward
                                         read hidden and weight once                  bytes (N + V) H B
                                         one product hidden @ weight.T                FLOPs 2 N V H
  the same, forward + backward           read hidden and weight in the forward and    bytes 4 (N + V) H B
                                         in the backward's two products, write the
                                         gradients of both once
                                         three products: the forward's, dL/dhidden =  FLOPs 6 N V H
                                         G @ weight and dL/dweight = G.T @ hidden
  A line that never stores the logits (ours, Cut-Cross-Entropy, Liger's and verl's fused kernels) recomputes
  them in the backward, a fourth product (8 N V H): its best is 75 % of this floor. A line that stores them
  (eager) moves 2 N V B more bytes per stored copy, which is not counted: the floor is the least work.

The floor of a case on a device is max(bytes / bandwidth, FLOPs / tensor-core rate). Devices: the H100 SXM
and H200 datasheets (3.35 and 4.8 TB/s, 989 TFLOP/s dense bf16) and what was measured on the lent H200
(about 4.3 TB/s for a device-to-device copy, counting bytes read and written, and 790 TFLOP/s for an
8192^3 bf16 product); an H200's floors use the measured figures, which a kernel can reach. fp32 products
run on the tensor cores as TF32 at half the bf16 rate, which the model uses for fp32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    """A device's rates: `bytes_per_s` of HBM traffic, `flops_per_s` of dense bf16/fp16 tensor-core work."""

    name: str
    bytes_per_s: float
    flops_per_s: float
    source: str


H100_SXM = Device("H100 SXM", 3.35e12, 989e12, "datasheet")
H200_NOMINAL = Device("H200 (nominal)", 4.8e12, 989e12, "datasheet")
H200_MEASURED = Device("H200 (measured)", 4.3e12, 790e12, "measured on the lent H200: device-to-device copy "
                       "4.3 TB/s (read + write), 8192^3 bf16 torch.mm 790 TFLOP/s")
DEVICES = (H100_SXM, H200_NOMINAL, H200_MEASURED)
FLOOR_CHOICES = {"h100": H100_SXM, "h200": H200_MEASURED, "h200-nominal": H200_NOMINAL}


@dataclass(frozen=True)
class Work:
    """What one call must do at least: bytes moved through HBM and tensor-core FLOPs; `model` says how."""

    bytes: int
    flops: int
    model: str
    dtype: str = "bfloat16"

    def floor_s(self, device: Device) -> Tuple[float, str]:
        """(seconds, "memory" or "compute"): the larger of the two bounds on `device`."""
        rate = device.flops_per_s / (2 if self.dtype == "float32" else 1)   # TF32 runs at half the bf16 rate
        memory, compute = self.bytes / device.bytes_per_s, self.flops / rate
        return (memory, "memory") if memory >= compute else (compute, "compute")


def token_op_work(kind: str, n: int, v: int, dtype: str) -> Work:
    """kind: "forward" (read the logits once) or "forward+backward" (read twice, write the gradient once)."""
    passes = {"forward": 1, "forward+backward": 3}[kind]
    model = "read logits" if passes == 1 else "read logits twice, write their gradient"
    return Work(passes * n * v * BYTES[dtype], 0, model, dtype)


def fused_linear_work(kind: str, n: int, v: int, h: int, dtype: str) -> Work:
    """kind: "forward" (read hidden and weight, one product) or "forward+backward" (read them twice more,
    write both gradients, three products); 2 N V H FLOPs per product."""
    weights = (n + v) * h * BYTES[dtype]
    if kind == "forward":
        return Work(weights, 2 * n * v * h, "read hidden + weight; 1 product", dtype)
    if kind == "forward+backward":
        return Work(4 * weights, 6 * n * v * h, "read hidden + weight 3x, write both gradients; 3 products",
                    dtype)
    raise ValueError(f"kind must be 'forward' or 'forward+backward', got {kind!r}")


def device_for(gpu_name: Optional[str], forced: Optional[str] = None) -> Tuple[Device, str]:
    """The device whose floor applies to a run on `gpu_name` and a note saying how it was chosen: `forced`
    (a key of FLOOR_CHOICES, the command line's --floor) wins; an H100 by name is the H100 SXM (other H100
    variants have less bandwidth, so their % is understated), an H200 the measured H200; anything else gets
    the measured H200 floor with a note saying so."""
    if forced:
        if forced not in FLOOR_CHOICES:
            raise ValueError(f"floor must be one of {sorted(FLOOR_CHOICES)}, got {forced!r}")
        return FLOOR_CHOICES[forced], f"{FLOOR_CHOICES[forced].name} floor (given by --floor)"
    name = (gpu_name or "").upper()
    if "H200" in name:
        return H200_MEASURED, f"{H200_MEASURED.name} floor ({gpu_name})"
    if "H100" in name or "H800" in name:
        return H100_SXM, f"{H100_SXM.name} floor ({gpu_name})"
    return H200_MEASURED, f"{H200_MEASURED.name} floor: {gpu_name or 'this device'} is neither an H100 nor an H200"


def percent_of_floor(floor_s: float, seconds: float) -> float:
    """100 x floor / time: 100 % is a line at the floor."""
    return 100.0 * floor_s / seconds


@dataclass(frozen=True)
class Row:
    """One line of the roofline table: a case (or its forward phase) at one point."""

    label: str
    n: int
    v: int
    h: Optional[int]
    work: Work


def table(rows: Iterable[Row]) -> str:
    """Markdown: bytes, FLOPs and the floor on each device (ms, with the bound: m = memory, c = compute)."""
    head = ("| case | N | V | H | dtype | GB moved | TFLOP | " + " | ".join(f"{d.name} ms" for d in DEVICES)
            + " | what is counted |")
    out = [head, "|---" * (8 + len(DEVICES)) + "|"]
    for r in rows:
        floors = []
        for device in DEVICES:
            seconds, bound = r.work.floor_s(device)
            floors.append(f"{seconds * 1e3:.3g} ({bound[0]})")
        out.append(f"| {r.label} | {r.n} | {r.v} | {r.h or '-'} | {r.work.dtype} | {r.work.bytes / 1e9:.3g} | "
                   f"{r.work.flops / 1e12:.3g} | " + " | ".join(floors) + f" | {r.work.model} |")
    return "\n".join(out)


def legend() -> List[str]:
    return [f"- {d.name}: {d.bytes_per_s / 1e12:.3g} TB/s, {d.flops_per_s / 1e12:.0f} TFLOP/s dense bf16 "
            f"({d.source})" for d in DEVICES] + [
        "- ms: the floor max(bytes / bandwidth, FLOPs / rate); (m) memory-bound, (c) compute-bound. The GPU "
        "profiles use the H100 SXM row on an H100, the measured H200 row on an H200 (and on any other device, "
        "saying so).",
        "- fused linear fwd+bwd: 3 products; a line that never stores the logits recomputes them (4 products), "
        "so its best is 75 % of this floor."]
