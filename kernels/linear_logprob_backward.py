"""Backward of the fused linear log-prob: d_hidden, d_weight and d_bias, one chunk of rows at a time.

What: with upstream gradient g (0 on ignored rows) and the forward's normaliser (max_logit, log_norm),
    d_logits = g * (onehot(label) - exp((logits - max_logit) - log_norm))
    d_hidden = d_logits @ W,   d_weight = d_logits^T @ h,   d_bias = sum over rows of d_logits.

Strategy: the rows are cut into chunks of C rows (`backward_chunk_rows`). For each chunk a Triton kernel recomputes the
logit tiles (a GEMM over the hidden size, `logit_tile`), applies the softmax gradient in fp32 in registers and stores
d_logits once, in the input dtype, into a (C, V) buffer; the fp32 logits never reach memory. The two gradient products
then read that buffer: d_hidden[chunk] = d_logits @ W, and d_weight (+)= d_logits^T @ h[chunk]. Unless they skip
filtered tiles they are cuBLAS calls on the 16-bit operands with fp32 accumulation. Either way every heavy product runs
on tensor cores and every output element has a single writer: no atomics, and the gradients do not depend on scheduling.
d_bias is the fp32 column sum of the stored d_logits.

Gradient filtering (`filter_eps` > 0, the FILTER variant of the kernel; dama_kernels.grad_filter): a program whose tile
has every |onehot - softmax| of its rows with a gradient below filter_eps stores zeros and flags the tile in a small
(row blocks, vocabulary blocks) int32 map, which the counter of grad_filter reads when asked. With `skip_filtered`
(the default) the columns hold the words in order of mean logit (grad_filter.vocabulary_order) and the two products
are Triton kernels that multiply only the tiles the map kept (dama_kernels.linear_logprob_kept_tiles), so their work
shrinks with the share filtered; without it the products stay dense, which is faster when few tiles are filtered.

FLOPs: 2 N H V to recompute the logits (Triton) plus 2 N H V for each of d_hidden and d_weight (cuBLAS; when skipping
filtered tiles, times the share kept). What the split costs in memory traffic: d_logits (N x V over all chunks, in
the input dtype) is written once and read by each product (only its kept tiles when skipping), and d_weight is read
and written once per chunk after the first.

Numerics: d_logits is rounded to the input dtype before its two matmuls, as autograd through a 16-bit lm_head does (fp16
then relies on loss scaling to keep tiny probabilities from underflowing; fp32 inputs keep fp32 d_logits); both products
accumulate in fp32. d_weight is kept in the weight's dtype, without a (V, H) fp32 buffer, up to MAX_ROUNDED_CHUNKS
chunks: each chunk's sum (previous d_weight + product) is formed in fp32 and rounded once, so a single chunk is rounded
exactly once, as autograd's is, and four chunks at most four times (each within half a unit in the last place). More
chunks of 16-bit inputs accumulate in fp32 and are cast once at the end. Under the Triton interpreter tiles are upcast
(`UPCAST_DOT`) and the dense matmuls run on the CPU on upcast fp32 operands; the interpreter rounds fp32 -> bf16 stores
toward zero, where a GPU rounds to nearest, so there bf16 d_logits (and the filtered products' 16-bit outputs) carry up
to one unit in the last place instead of half.

Limits: the working memory is the (C, V) buffer, never (N, V), plus a (V, H) fp32 accumulator beyond
MAX_ROUNDED_CHUNKS chunks of 16-bit inputs (and, when a torch's addmm refuses an fp32 addend, a second one per chunk,
see `_add_product_fp32`). Offsets are int64.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .grad_filter import record_tiles, vocabulary_order
from .launch_config import KernelLaunch, LinearLogprobBlocks, device_kept_blocks
from .linear_logprob_forward import dot_settings
from .linear_logprob_kept_tiles import d_hidden_kept_launch, d_weight_kept_launch, kept_tiles
from .linear_logprob_tiles import logit_tile

# Bytes of one chunk's d_logits buffer, the backward's working memory. 128 MiB holds 2048 rows of a 32k vocabulary in
# 16-bit: each chunk's matmuls are then 2048 x 4096 x 32064 (0.27 TFLOP each), large enough for cuBLAS to run near its
# peak, and up to 2048 supervised tokens (a few LLaVA pairs) are a single chunk.
D_LOGITS_CHUNK_BYTES = 128 * 2**20
# Chunks hold whole row blocks of every GPU tile height we launch, so only the last chunk has a masked row block.
CHUNK_ROW_MULTIPLE = 256
# Most chunks whose d_weight products are summed in the 16-bit weight dtype (one rounding per chunk, each at most half
# a unit in the last place: at most 2 units over 4 chunks, the bound the chunked-backward test holds); beyond it an fp32
# accumulator. 4 chunks of 2048 rows cover 8192 tokens of a 32k-vocabulary head in 16-bit.
MAX_ROUNDED_CHUNKS = 4


@dataclass(frozen=True)
class TileFilter:
    """How the d_logits kernel filters (dama_kernels.grad_filter): tiles whose every |onehot - softmax| of rows with a
    gradient is below `eps` (> 0) are stored as zeros and flagged 1 in `tile_skipped` (int32, d_logits_grid's shape,
    contiguous; 0 for the others). `vocab_order` (V,) int32, when given, is the word of each d_logits column, so that
    words likely to matter share tiles (grad_filter.vocabulary_order); None keeps the vocabulary's own order."""

    eps: float
    tile_skipped: torch.Tensor
    vocab_order: torch.Tensor | None = None


def backward_chunk_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk: as many whole multiples of CHUNK_ROW_MULTIPLE as fit D_LOGITS_CHUNK_BYTES, at least one."""
    rows = D_LOGITS_CHUNK_BYTES // (vocab_size * dtype.itemsize)
    return max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)


@triton.jit
def _linear_logprob_d_logits_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    max_logit_ptr,
    log_norm_ptr,
    grad_ptr,
    d_logits_ptr,
    tile_skipped_ptr,
    vocab_order_ptr,
    # strides
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    stride_d_logits_n,
    # sizes
    num_rows,
    hidden_size,
    vocab_size,
    ignore_index,
    filter_eps,
    # meta
    HAS_BIAS: tl.constexpr,
    FILTER: tl.constexpr,
    SORTED_VOCAB: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Row blocks vary fastest, so the programs in flight share a few weight column tiles and the chunk's hidden rows
    # (C x H, a few MiB) stay in L2 while the weight streams through once per chunk.
    block_row = tl.program_id(0).to(tl.int64)
    block_col = tl.program_id(1).to(tl.int64)
    rows = block_row * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = block_col * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < vocab_size
    if SORTED_VOCAB:  # column j of d_logits is word vocab_order[j]
        words = tl.load(vocab_order_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    else:
        words = cols
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    max_logit = tl.load(max_logit_ptr + rows, mask=row_ok, other=0.0)
    log_norm = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    # Ignored rows get a zero gradient whatever arrives for them (NaN included).
    grad = tl.where(labels != ignore_index, grad, 0.0)

    logits = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, words, row_ok, col_ok,
        stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h, hidden_size,
        HAS_BIAS=HAS_BIAS, UPCAST_DOT=UPCAST_DOT, INPUT_PRECISION=INPUT_PRECISION,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
    )  # (BLOCK_N, BLOCK_V)
    probs = tl.exp((logits - max_logit[:, None]) - log_norm[:, None])
    onehot = tl.where((words[None, :] == labels[:, None]) & col_ok[None, :], 1.0, 0.0)
    d_logits = grad[:, None] * (onehot - probs)  # (BLOCK_N, BLOCK_V) fp32
    if FILTER:
        # Only rows that receive a gradient decide: ignored and masked rows are zeros whatever their softmax.
        counted = (grad != 0.0)[:, None] & col_ok[None, :]
        largest = tl.max(tl.max(tl.where(counted, tl.abs(onehot - probs), 0.0), axis=1), axis=0)
        skipped = largest < filter_eps
        d_logits = tl.where(skipped, 0.0, d_logits)
        tl.store(tile_skipped_ptr + block_row * tl.num_programs(1) + block_col, skipped.to(tl.int32))
    tl.store(
        d_logits_ptr + rows[:, None] * stride_d_logits_n + cols[None, :],
        d_logits.to(d_logits_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def d_logits_grid(num_rows: int, vocab_size: int, blocks: LinearLogprobBlocks) -> tuple[int, int]:
    """(row blocks, vocabulary blocks) of the d_logits kernel for C rows: one program, and one tile, each."""
    return triton.cdiv(num_rows, blocks.block_n), triton.cdiv(vocab_size, blocks.block_v)


def linear_logprob_d_logits_launch(
    d_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    grad_token_logps: torch.Tensor,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
    tile_filter: TileFilter | None = None,
) -> KernelLaunch:
    """The d_logits kernel's launch for C rows, which writes every element of `d_logits`.

    Shapes: d_logits (C, V) contiguous, in hidden's dtype; hidden (C, H); weight (V, H); labels (C,) contiguous;
    bias (V,) or None; max_logit, log_norm (C,) fp32 from the forward; grad_token_logps (C,) contiguous.
    `tile_filter` filters tiles (its tile map must have d_logits_grid's shape); None computes every tile exactly.
    """
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    upcast, precision = dot_settings(hidden.dtype)
    filtering = tile_filter is not None
    if filtering and (tile_filter.eps <= 0 or tile_filter.tile_skipped.shape != d_logits_grid(num_rows, vocab_size,
                                                                                              blocks)):
        raise ValueError("a tile filter needs eps > 0 and a tile map of d_logits_grid's shape")
    vocab_order = tile_filter.vocab_order if filtering else None
    arguments = dict(
        hidden_ptr=hidden,
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else hidden,  # never read when HAS_BIAS is False
        labels_ptr=labels,
        max_logit_ptr=max_logit,
        log_norm_ptr=log_norm,
        grad_ptr=grad_token_logps,
        d_logits_ptr=d_logits,
        tile_skipped_ptr=tile_filter.tile_skipped if filtering else labels,  # never written when FILTER is False
        vocab_order_ptr=vocab_order if vocab_order is not None else labels,  # read only when SORTED_VOCAB
        stride_hidden_n=hidden.stride(0),
        stride_hidden_h=hidden.stride(1),
        stride_weight_v=weight.stride(0),
        stride_weight_h=weight.stride(1),
        stride_d_logits_n=d_logits.stride(0),
        num_rows=num_rows,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        filter_eps=float(tile_filter.eps) if filtering else 0.0,
        HAS_BIAS=bias is not None,
        FILTER=filtering,
        SORTED_VOCAB=vocab_order is not None,
        UPCAST_DOT=upcast,
        INPUT_PRECISION=precision,
        BLOCK_N=blocks.block_n,
        BLOCK_V=blocks.block_v,
        BLOCK_H=blocks.block_h,
    )
    return KernelLaunch(
        kernel=_linear_logprob_d_logits_kernel,
        grid=d_logits_grid(num_rows, vocab_size, blocks),
        arguments=arguments,
        options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
    )


def linear_logprob_d_logits_triton(
    d_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    grad_token_logps: torch.Tensor,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
    tile_filter: TileFilter | None = None,
) -> None:
    """Launch the d_logits kernel for C rows (arguments as in linear_logprob_d_logits_launch)."""
    linear_logprob_d_logits_launch(
        d_logits, hidden, weight, labels, bias, max_logit, log_norm, grad_token_logps, ignore_index, blocks,
        tile_filter,
    ).run()


@contextlib.contextmanager
def fp32_partial_sums() -> Iterator[None]:
    """Within the block, 16-bit cuBLAS products keep every partial sum in fp32.

    By default torch lets cuBLAS reduce split-K partial sums in the 16-bit output dtype; the products here that write
    d_hidden and d_weight in that dtype would then round more than once.
    """
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = previous


@functools.cache
def _addmm_takes_fp32_addend(device: torch.device) -> bool:
    """Whether this torch's addmm(out_dtype=fp32) adds 16-bit products into an fp32 tensor in place on `device`.

    Some releases with out_dtype require the addend in the operands' dtype; they get a separate product instead.
    Probed once per device, on the first backward that needs an fp32 accumulator.
    """
    accumulator = torch.ones((1, 1), dtype=torch.float32, device=device)
    operand = torch.full((1, 1), 3.0, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(accumulator, operand, operand, out_dtype=torch.float32, out=accumulator)
    except (RuntimeError, TypeError):
        return False
    return accumulator.item() == 10.0


def _add_product_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """accumulator (fp32) += a @ b, the product accumulated in fp32, in place."""
    if a.dtype == torch.float32:
        return accumulator.addmm_(a, b)
    if _addmm_takes_fp32_addend(a.device):
        # cuBLAS reads the fp32 accumulator in its epilogue: no (V, H) temporary, one read and one write of it.
        return torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    return accumulator.add_(torch.mm(a, b, out_dtype=torch.float32))


def _add_product_rounded(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """accumulator (16-bit) <- round(accumulator + a @ b), the sum formed in fp32 and rounded once, in place.

    On a GPU that is cuBLAS's epilogue (beta = 1, fp32 compute); on the CPU the 16-bit operands arrive upcast.
    """
    if a.dtype == accumulator.dtype:  # beta = 1: cuBLAS reads the 16-bit accumulator into its fp32 epilogue
        return accumulator.addmm_(a, b)
    return accumulator.copy_(torch.addmm(accumulator.float(), a, b))


def _dense_products(
    d_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight_operand: torch.Tensor,
    d_hidden: torch.Tensor | None,
    d_weight: torch.Tensor | None,
    accumulate: bool,
    native: bool,
) -> None:
    """One chunk's d_hidden = d_logits @ W and d_weight (+)= d_logits^T @ h as dense matmuls, written in place.

    Shapes: d_logits (C, V), hidden (C, H), weight_operand (V, H) (upcast off a GPU for 16-bit inputs), d_hidden (C, H)
    or None, d_weight (V, H) or None, in the weight's dtype or fp32 (an fp32 accumulator for 16-bit inputs).
    `native`: the operands go into the matmuls in their own dtype (CUDA, or fp32).
    """
    d_logits_operand = d_logits if native else d_logits.float()
    if d_hidden is not None:
        if native:  # written in hidden's dtype by the product itself: one rounding of an fp32 accumulation
            torch.mm(d_logits_operand, weight_operand, out=d_hidden)
        else:
            d_hidden.copy_(d_logits_operand @ weight_operand)
    if d_weight is None:
        return
    hidden_operand = hidden if native else hidden.float()  # (C, H)
    if d_weight.dtype == torch.float32 and d_logits.dtype != torch.float32:  # the fp32 accumulator of 16-bit inputs
        if not accumulate:  # zeroed, not a product copied in: no second (V, H) fp32 tensor
            d_weight.zero_()
        _add_product_fp32(d_weight, d_logits_operand.T, hidden_operand)
    elif accumulate:
        _add_product_rounded(d_weight, d_logits_operand.T, hidden_operand)
    elif native:  # in the weight's dtype, accumulated in fp32 by cuBLAS
        torch.mm(d_logits_operand.T, hidden_operand, out=d_weight)
    else:  # an upcast product on the CPU, rounded once
        d_weight.copy_(d_logits_operand.T @ hidden_operand)


def linear_logprob_bwd_triton(
    grad_token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
    needs_grad: tuple[bool, bool, bool],
    chunk_rows: int | None = None,
    filter_eps: float = 0.0,
    skip_filtered: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(grad_token_logps * token_logps) w.r.t. hidden, weight and bias, chunk by chunk.

    Shapes: grad_token_logps (N,), hidden (N, H) with N >= 1, weight (V, H), labels (N,) contiguous, bias (V,) or
    None, max_logit (N,) and log_norm (N,) fp32 from the forward.
    `needs_grad` says which of (hidden, weight, bias) want a gradient; the others come back as None.
    `chunk_rows` overrides backward_chunk_rows (tests and benchmarks). `filter_eps` > 0 filters d_logits tiles
    (dama_kernels.grad_filter); 0 computes every tile exactly. With filtering, `skip_filtered` puts the words in order
    of mean logit and multiplies only the kept tiles (linear_logprob_kept_tiles); False keeps the vocabulary's order
    and the dense products.
    Returns (d_hidden (N, H), d_weight (V, H), d_bias (V,)) in the dtypes of their inputs.
    """
    need_hidden, need_weight, need_bias = needs_grad
    num_tokens = hidden.shape[0]
    vocab_size = weight.shape[0]
    if chunk_rows is None:
        chunk_rows = backward_chunk_rows(vocab_size, hidden.dtype)
    grad_token_logps = grad_token_logps.contiguous()
    # cuBLAS takes 16-bit operands with fp32 results; the CPU (the interpreter's home) has no such matmul, so there the
    # dense products' operands are upcast, the weight once per call (the filtered products upcast their tiles).
    native = hidden.is_cuda or hidden.dtype == torch.float32
    filtering = filter_eps > 0
    skipping = filtering and skip_filtered
    weight_operand = weight if native or skipping else weight.float()  # (V, H)
    num_chunks = triton.cdiv(num_tokens, chunk_rows)
    # d_weight is written in the weight's dtype, without a (V, H) fp32 buffer, where that costs at most
    # MAX_ROUNDED_CHUNKS roundings of a sum formed in fp32: a single chunk's product is rounded once, as the fp32
    # accumulator's final cast did; fp32 keeps its own dtype throughout.
    accumulate_fp32 = need_weight and num_chunks > MAX_ROUNDED_CHUNKS and weight.dtype != torch.float32

    buffer_rows = min(chunk_rows, num_tokens)
    buffer = torch.empty((buffer_rows, vocab_size), dtype=hidden.dtype, device=hidden.device)
    if filtering:
        tile_skipped = torch.empty(d_logits_grid(buffer_rows, vocab_size, blocks), dtype=torch.int32,
                                   device=hidden.device)
    # d_logits columns hold the words in this order (None: the vocabulary's)
    vocab_order = vocabulary_order(hidden, weight, bias) if skipping else None
    map_tile = (blocks.block_n, blocks.block_v)
    kept_blocks = {product: device_kept_blocks(product, hidden.device, hidden.dtype, map_tile)
                   for product in ("d_hidden", "d_weight")} if skipping else {}
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = None  # created by the first chunk's product
    d_bias = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if need_bias else None
    with fp32_partial_sums():
        for start in range(0, num_tokens, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_tokens))
            d_logits = buffer[: rows.stop - start]  # (C, V)
            grid = d_logits_grid(rows.stop - start, vocab_size, blocks)
            chunk_skipped = tile_skipped[: grid[0]] if filtering else None
            linear_logprob_d_logits_triton(
                d_logits, hidden[rows], weight, labels[rows], bias, max_logit[rows], log_norm[rows],
                grad_token_logps[rows], ignore_index, blocks,
                TileFilter(filter_eps, chunk_skipped, vocab_order) if filtering else None,
            )
            record_tiles(chunk_skipped if filtering else 0, grid[0] * grid[1])
            if need_weight and d_weight is None:
                d_weight_dtype = torch.float32 if accumulate_fp32 else weight.dtype
                d_weight = torch.empty(weight.shape, dtype=d_weight_dtype, device=weight.device)
                accumulate = False
            else:
                accumulate = True
            if skipping:  # only the tiles kept by the filter are multiplied
                kept_cols, kept_col_count, kept_rows, kept_row_count = kept_tiles(chunk_skipped)
                if need_hidden:
                    d_hidden_kept_launch(d_hidden[rows], d_logits, weight, kept_cols, kept_col_count, map_tile,
                                         kept_blocks["d_hidden"], vocab_order).run()
                if need_weight:
                    d_weight_kept_launch(d_weight, d_logits, hidden[rows], kept_rows, kept_row_count, map_tile,
                                         kept_blocks["d_weight"], accumulate, vocab_order).run()
            else:
                _dense_products(d_logits, hidden[rows], weight_operand, d_hidden[rows] if need_hidden else None,
                                d_weight if need_weight else None, accumulate, native)
            if need_bias:
                column_sums = d_logits.sum(dim=0, dtype=torch.float32)  # (V,), in d_logits' column order
                if skipping:
                    d_bias.index_add_(0, vocab_order, column_sums)
                else:
                    d_bias += column_sums
    # Free the d_logits buffer before a 16-bit copy of an fp32 d_weight is allocated: the two need not coexist.
    del buffer, d_logits
    return (
        d_hidden,
        d_weight.to(weight.dtype) if need_weight else None,
        d_bias.to(bias.dtype) if need_bias else None,
    )
