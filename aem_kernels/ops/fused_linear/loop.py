"""The fused-linear op's one chunk loop, over row chunks or vocab blocks, with a per-chunk step.

Every BLAS path of the op walks the logits z = X W^T + b the same way: select the active rows (label not
ignore_index; the others cost no matmul and get zeros), then for each chunk of the chunked axis, in a fixed
order, compute that chunk's logits into ONE reused buffer (the plan's, `plan.py`) and hand them to a step:

    chunk_loop(RowChunks(...), step)    rows [start, stop) of the active rows, all V columns: the chunked
                                        path's forward, backward and single pass (`chunked.py`) and the
                                        vocab-parallel op's forward and backward (`vocab_parallel.py`)
    chunk_loop(VocabBlocks(...), step)  columns [start, stop) of the vocabulary, all active rows: the blocked
                                        path's forward and backward (`blocked.py`)

The loop owns what the steps share: the active-row gather (a per-chunk index_select, never a copy of all the
active rows), the weight and bias as the chunks' products take them (row chunks: `products.py`, the working
dtype's products (the weight itself for fp32/fp64, one fp32 copy for half precision) or the CUDA plan's
half-precision products (the weight itself); vocab blocks: one fp32 block at a time), the reused logits
buffer, and their release when the loop ends. A step reads `chunk.z` (and may overwrite it with dL/dz: the
buffer is its own until it returns). The order of chunks and of the products inside a chunk is fixed, so every pass over the
same plan gives bit-identical numbers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from .plan import BlockPlan
from .products import WorkProducts

__all__ = ["ActiveRows", "GradHidden", "RowChunk", "RowChunks", "VocabBlock", "VocabBlocks", "accumulate",
           "active_rows", "chunk_loop"]

_WORK_HALF = torch.float32   # the blocked path's working dtype (bf16/fp16 inputs)


def active_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows to compute, or None when every row is active (no copy then). Under torch.compile
    (the vocab-parallel fused op is traced; the fused-linear op is a custom op) every row is computed: the
    row kernels give ignored rows zeros, and the selection would be a data-dependent shape."""
    if torch.compiler.is_compiling():
        return None
    active = labels != ignore_index
    if bool(active.all()):
        return None
    return active.nonzero().squeeze(1)


class ActiveRows:
    """The rows [N] whose label is not `ignore_index`: `index` [N_active] (None when all are), `n_rows` N,
    `n_active`; `pick` takes their entries of an [N, ...] tensor, `spread` puts [N_active, ...] values back
    into [N, ...] with zeros on the ignored rows."""

    def __init__(self, labels: torch.Tensor, ignore_index: int) -> None:
        self.n_rows = labels.shape[0]
        self.index = active_rows(labels, ignore_index) if self.n_rows else None
        self.n_active = self.n_rows if self.index is None else self.index.shape[0]

    def pick(self, values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return values if values is None or self.index is None else values.index_select(0, self.index)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return values
        return values.new_zeros((self.n_rows,) + tuple(values.shape[1:])).index_copy_(0, self.index, values)

    def gather(self, hidden2d: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Active rows [start, stop) of hidden2d: a slice when every row is active, else a gather of these rows
        only (O(chunk x H) memory)."""
        return hidden2d[start:stop] if self.index is None else hidden2d.index_select(0, self.index[start:stop])


# ---- row chunks --------------------------------------------------------------------------------------------

class RowChunk(NamedTuple):
    """Chunk `number` of the active rows [start, stop): x [n, H] (the products' operand: working dtype, or
    the inputs' half precision on the CUDA plan), z = x W^T + b [n, V] in the working dtype (the reused
    buffer), the products' weight [V, H] (for dL/dx = dz W) and the products themselves."""
    number: int
    start: int
    stop: int
    x: torch.Tensor
    z: torch.Tensor
    weight: torch.Tensor
    products: object = None


class RowChunks:
    """Chunks of `rows_per_chunk` active rows of hidden2d [N, H] over weight [V, H] (+ bias [V]), multiplied
    by `products` (None: `products.WorkProducts(work)`)."""

    def __init__(self, hidden2d: torch.Tensor, rows: ActiveRows, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rows_per_chunk: int, work: torch.dtype, products=None) -> None:
        self.hidden2d, self.rows, self.weight, self.bias, self.work = hidden2d, rows, weight, bias, work
        self.products = products if products is not None else WorkProducts(work)
        self.total, self.size, self.live = rows.n_active, rows_per_chunk, rows.n_active > 0

    def open(self):
        w_op, b_op = self.products.operands(self.weight, self.bias)
        buffer = torch.empty(min(self.size, self.total), self.weight.shape[0], dtype=self.work,
                             device=self.hidden2d.device)
        return w_op, b_op, buffer

    def chunk(self, buffers, number: int, start: int, stop: int) -> RowChunk:
        w_op, b_op, buffer = buffers
        x = self.products.rows(self.rows.gather(self.hidden2d, start, stop))
        z = self.products.logits(x, w_op, b_op, buffer[:stop - start])
        return RowChunk(number, start, stop, x, z, w_op, self.products)


class GradHidden:
    """grad_hidden [N, H] in the working dtype, zeros on ignored rows, written chunk by chunk: straight into its
    rows when every row is active, else by an index_copy of the chunk's product (no [N_active, H] staging)."""

    def __init__(self, rows: ActiveRows, hidden: int, work: torch.dtype, device: torch.device) -> None:
        self.index = rows.index
        self.buffer = torch.zeros(rows.n_rows, hidden, dtype=work, device=device)

    def write(self, start: int, stop: int, parts, weight: torch.Tensor, products) -> None:
        """Rows [start, stop) of the active rows = dz @ W, dz given as the products' `parts`."""
        if self.index is None:
            products.grad_hidden(parts, weight, self.buffer[start:stop])
        else:
            self.buffer.index_copy_(0, self.index[start:stop], products.grad_hidden(parts, weight, None))


def accumulate(chunk: RowChunk, dx: Optional[GradHidden], dw: Optional[torch.Tensor],
               db: Optional[torch.Tensor]) -> None:
    """One row chunk's share of the three gradients, its z holding dL/dz: grad_b += sum dz (from the fp32
    dz), then dz as the products' operands (`products.Parts`: itself, or half-precision parts formed in its
    buffer, which is then spent), grad_hidden rows = dz @ W, grad_W += dz^T x."""
    dz, products = chunk.z, chunk.products
    if db is not None:
        db += dz.sum(0)
    if dx is None and dw is None:
        return
    parts = products.parts(dz)
    if dx is not None:
        dx.write(chunk.start, chunk.stop, parts, chunk.weight, products)
    if dw is not None:
        products.grad_weight(parts, chunk.x, dw, dz.view(-1))


# ---- vocab blocks ------------------------------------------------------------------------------------------

class HiddenPieces:
    """The active hidden rows as fp32 pieces of `step` rows (upcast once when that is all of them)."""

    def __init__(self, hidden2d: torch.Tensor, rows: ActiveRows, step: int):
        self.hidden2d, self.rows, self.step = hidden2d, rows, step
        self.starts = range(0, rows.n_active, step)
        self.whole = self._upcast(0, rows.n_active) if step >= rows.n_active else None
        self.piece = None if self.whole is not None else torch.empty(step, hidden2d.shape[1], dtype=_WORK_HALF,
                                                                     device=hidden2d.device)

    def _upcast(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = self.rows.gather(self.hidden2d, start, stop)
        return rows.to(_WORK_HALF) if out is None else out.copy_(rows)

    def pieces(self):
        """(start, stop, fp32 rows) over every active row."""
        if self.whole is not None:
            yield 0, self.whole.shape[0], self.whole
            return
        for start in self.starts:
            stop = min(start + self.step, self.starts.stop)
            yield start, stop, self._upcast(start, stop, self.piece[:stop - start])


class VocabBlock(NamedTuple):
    """Block `number`, the vocabulary columns [start, stop): z [N_active, V_k] fp32 = X W_k^T + b_k (the reused
    buffer), W_k [V_k, H] fp32, the labels' place (in_block [N_active]; local label y - start there, column 0
    elsewhere) and the fp32 hidden pieces (for dW_k = dz^T X)."""
    number: int
    start: int
    stop: int
    z: torch.Tensor
    weight: torch.Tensor
    in_block: torch.Tensor
    local: torch.Tensor
    hidden: HiddenPieces


def _view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return flat[:rows * cols].view(rows, cols)


def block_logits(pieces: HiddenPieces, w_k: torch.Tensor, b_k: Optional[torch.Tensor],
                 out: torch.Tensor) -> torch.Tensor:
    """out [n, V_k] = X @ W_k^T (+ b_k) in fp32 (the bias inside the product: no extra pass over out)."""
    for start, stop, x in pieces.pieces():
        if b_k is None:
            torch.mm(x, w_k.t(), out=out[start:stop])
        else:
            torch.addmm(b_k, x, w_k.t(), out=out[start:stop])
    return out


class VocabBlocks:
    """Blocks of `plan.columns` vocabulary columns of weight [V, H] (+ bias [V], bf16/fp16) over every active
    row of hidden2d [N, H]; labels_active [N_active] int64."""

    def __init__(self, hidden2d: torch.Tensor, rows: ActiveRows, labels_active: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], plan: BlockPlan) -> None:
        self.hidden2d, self.rows, self.labels, self.weight, self.bias = hidden2d, rows, labels_active, weight, bias
        self.plan = plan
        self.total, self.size, self.live = weight.shape[0], plan.columns, rows.n_active > 0

    def open(self):
        """The fp32 hidden pieces and flat fp32 storage of the logits block and of the weight block (the last
        block views a prefix of it)."""
        n_active, hidden, device = self.rows.n_active, self.weight.shape[1], self.hidden2d.device
        pieces = HiddenPieces(self.hidden2d, self.rows, self.plan.hidden_rows)
        return (pieces, torch.empty(n_active * self.size, dtype=_WORK_HALF, device=device),
                torch.empty(self.size * hidden, dtype=_WORK_HALF, device=device))

    def chunk(self, buffers, number: int, v0: int, v1: int) -> VocabBlock:
        pieces, z_flat, w_flat = buffers
        width, hidden = v1 - v0, self.weight.shape[1]
        w_k = _view(w_flat, width, hidden).copy_(self.weight[v0:v1])
        b_k = self.bias[v0:v1].to(_WORK_HALF) if self.bias is not None else None
        z = block_logits(pieces, w_k, b_k, _view(z_flat, self.rows.n_active, width))
        in_block = (self.labels >= v0) & (self.labels < v1)
        return VocabBlock(number, v0, v1, z, w_k, in_block, torch.where(in_block, self.labels - v0, 0), pieces)


# ---- the loop ----------------------------------------------------------------------------------------------

def chunk_loop(chunks: Union[RowChunks, VocabBlocks], step: Callable[[Union[RowChunk, VocabBlock]], None]) -> None:
    """The op's one chunk loop: for chunk k = 0, 1, ... of `chunks.size` along the chunked axis (`chunks.total`
    rows or columns), in order, that chunk's logits into the reused buffer, then step(chunk). Nothing runs when
    no row is active; the buffers are released when the loop ends."""
    if not chunks.live:
        return
    buffers = chunks.open()
    for number, start in enumerate(range(0, chunks.total, chunks.size)):
        step(chunks.chunk(buffers, number, start, min(start + chunks.size, chunks.total)))
    del buffers
