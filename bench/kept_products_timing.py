"""The measurements behind bench.kept_products: one chunk's two gradient products, dense (cuBLAS) and over the kept
tiles of a random tile map (Triton), timed side by side and checked against each other.

Import this module only once the Triton interpreter is chosen or not: dama_kernels defines its kernels for one or the
other when it is first imported (bench.kept_products sets TRITON_INTERPRET=1 for --dry-run before importing it).

Shapes: C rows of the chunk, H hidden size, V vocabulary. The tile map is (R, T) int32 over tiles of
map_tile = (rows, words), the d_logits kernel's blocks on this device, as in the backward.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton.testing

from dama_kernels.launch_config import (
    KeptProductBlocks,
    LinearLogprobBlocks,
    device_blocks,
    device_kept_blocks,
    fit_to_map,
)
from dama_kernels.linear_logprob_backward import d_logits_grid, fp32_partial_sums
from dama_kernels.linear_logprob_kept_tiles import d_hidden_kept_launch, d_weight_kept_launch, kept_tiles

PRODUCTS = ("d_hidden", "d_weight")
# Alternatives to the launcher's blocks (128 x 128 x 64, 8 warps, 5 stages for 16-bit tiles), timed through the
# vocabulary order as the backward runs them. Each divides the d_logits tiles of every target (128 x 128, and
# 128 x 256 on sm_90) along both products' output and reduction dimensions, so on a GPU fit_to_map leaves them as they
# are. On sm_90 stages come in pairs: compiled by Triton 3.8 (bf16, this shape), 3 and 4 stages give the same cubin
# and keep two K steps' tiles in shared memory, 5 and 6 three (97 KiB at 128 x 128 x 64, 145 KiB at 128 x 256 x 64),
# 7 four (129 KiB), so one of each pair is listed. Shared memory: 65-145 KiB on sm_90, 32-96 KiB on sm_80; a candidate
# that does not build or launch on the GPU at hand is reported skipped.
CANDIDATE_BLOCKS = (
    KeptProductBlocks(block_out=128, block_hidden=128, block_k=64, num_warps=8, num_stages=4),
    KeptProductBlocks(block_out=128, block_hidden=128, block_k=64, num_warps=8, num_stages=7),
    KeptProductBlocks(block_out=128, block_hidden=128, block_k=64, num_warps=4, num_stages=5),
    KeptProductBlocks(block_out=128, block_hidden=256, block_k=64, num_warps=8, num_stages=4),
    KeptProductBlocks(block_out=128, block_hidden=256, block_k=64, num_warps=8, num_stages=5),
    KeptProductBlocks(block_out=128, block_hidden=128, block_k=128, num_warps=8, num_stages=4),
)
# do_bench's warm-up and measuring time per timing, in ms: short, so that a run fits its step of bench/gpu_check.py,
# and still some 20 calls of a product of about 1 ms for the median.
WARMUP_MS, REP_MS = 10, 40
# Calls per timing under the interpreter, where times only show that the code runs (each takes 0.1 s).
INTERPRETER_CALLS = 1


@dataclass(frozen=True)
class ChunkShape:
    rows: int  # C
    hidden_size: int  # H
    vocab_size: int  # V

    @property
    def dense_flops(self) -> int:
        """FLOPs of the two dense products, 2 C H V each."""
        return 4 * self.rows * self.hidden_size * self.vocab_size


@dataclass
class Setup:
    """What every share shares. hidden (C, H) and weight (V, H) in the run's dtype; vocab_order (V,) int32, a random
    permutation (the backward always passes an order when it filters); weight_by_column (V, H), the weight's rows
    placed so that through vocab_order, d_logits column k still multiplies weight[k], which gives every variant the
    same exact result. map_blocks: the d_logits kernel's blocks on this device, whose tiles the map counts."""

    shape: ChunkShape
    map_blocks: LinearLogprobBlocks
    hidden: torch.Tensor
    weight: torch.Tensor
    vocab_order: torch.Tensor
    weight_by_column: torch.Tensor

    @property
    def map_tile(self) -> tuple[int, int]:
        return self.map_blocks.block_n, self.map_blocks.block_v

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def kept_blocks(self, base: KeptProductBlocks | None = None) -> dict[str, KeptProductBlocks]:
        """Blocks per product: the launcher's (base None), or `base` fitted to the map's tiles."""
        if base is None:
            return {p: device_kept_blocks(p, self.device, self.hidden.dtype, self.map_tile) for p in PRODUCTS}
        return {p: fit_to_map(base, p, self.map_tile) for p in PRODUCTS}


@dataclass
class ShareInputs:
    """One kept share: tile_skipped (R, T) int32 (1 = filtered), d_logits (C, V) zero in the filtered tiles, its
    lists from kept_tiles, and the cuBLAS results d_hidden (C, H) and d_weight (V, H) that the others are held to."""

    share: float
    tile_skipped: torch.Tensor
    d_logits: torch.Tensor
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    d_hidden: torch.Tensor
    d_weight: torch.Tensor

    def fields(self) -> dict:
        tiles = self.tile_skipped.numel()
        kept = int((self.tile_skipped == 0).sum())
        return {"share": self.share, "tiles_kept": kept, "tiles": tiles, "kept_share": kept / tiles}


def random_tile_map(row_tiles: int, vocab_tiles: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """(row_tiles, vocab_tiles) int32 on the generator's device, 1 = filtered, with exactly round(share x tiles) tiles
    kept (0), drawn at random."""
    tiles = row_tiles * vocab_tiles
    tile_skipped = torch.ones(tiles, dtype=torch.int32, device=generator.device)
    tile_skipped[torch.randperm(tiles, generator=generator, device=generator.device)[: round(share * tiles)]] = 0
    return tile_skipped.view(row_tiles, vocab_tiles)


def masked_d_logits(tile_skipped: torch.Tensor, map_tile: tuple[int, int], shape: ChunkShape, dtype: torch.dtype,
                    generator: torch.Generator) -> torch.Tensor:
    """(C, V) standard normal values in `dtype`, zero in the filtered tiles, on the generator's device."""
    kept = (tile_skipped == 0).repeat_interleave(map_tile[0], dim=0).repeat_interleave(map_tile[1], dim=1)
    values = torch.randn(shape.rows, shape.vocab_size, generator=generator, device=generator.device)
    return (values * kept[: shape.rows, : shape.vocab_size]).to(dtype)


def make_setup(shape: ChunkShape, dtype: torch.dtype, generator: torch.Generator) -> Setup:
    """The operands, drawn on the generator's device."""
    device = generator.device
    hidden = torch.randn(shape.rows, shape.hidden_size, generator=generator, device=device).to(dtype)
    weight = (torch.randn(shape.vocab_size, shape.hidden_size, generator=generator, device=device)
              / shape.hidden_size**0.5).to(dtype)
    vocab_order = torch.randperm(shape.vocab_size, generator=generator, device=device).to(torch.int32)
    weight_by_column = torch.empty_like(weight)
    weight_by_column[vocab_order.long()] = weight
    return Setup(shape, device_blocks("backward", device, dtype), hidden, weight, vocab_order, weight_by_column)


def make_share(setup: Setup, share: float, generator: torch.Generator) -> ShareInputs:
    """A tile map keeping `share` of the tiles, its d_logits, and the cuBLAS results on it."""
    shape = setup.shape
    tile_skipped = random_tile_map(*d_logits_grid(shape.rows, shape.vocab_size, setup.map_blocks), share, generator)
    d_logits = masked_d_logits(tile_skipped, setup.map_tile, shape, setup.hidden.dtype, generator)
    d_hidden, d_weight = torch.empty_like(setup.hidden), torch.empty_like(setup.weight)
    # The backward's unfiltered products (its _dense_products on a GPU).
    torch.mm(d_logits, setup.weight, out=d_hidden)
    torch.mm(d_logits.T, setup.hidden, out=d_weight)
    return ShareInputs(share, tile_skipped, d_logits, kept_tiles(tile_skipped), d_hidden, d_weight)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of fn in ms: triton.testing.do_bench on a GPU (L2 cleared before each call), else perf_counter."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    times = []
    for _ in range(INTERPRETER_CALLS):
        started = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the absolute error where expected is all zeros)."""
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return error / scale if scale > 0 else error


def blocks_text(blocks: KeptProductBlocks) -> str:
    return f"{blocks.block_out}x{blocks.block_hidden}x{blocks.block_k} w{blocks.num_warps} s{blocks.num_stages}"


class KeptProducts:
    """One share's Triton kept-tile products with given blocks, in the vocabulary's own order or through the setup's
    vocab_order, writing their own d_hidden (C, H) and d_weight (V, H) (a first chunk's: no accumulation)."""

    def __init__(self, setup: Setup, inputs: ShareInputs, blocks: dict[str, KeptProductBlocks], vocab_order: bool):
        kept_cols, kept_col_count, kept_rows, kept_row_count = inputs.lists
        self.setup, self.inputs, self.vocab_order = setup, inputs, vocab_order
        self.d_hidden, self.d_weight = torch.empty_like(inputs.d_hidden), torch.empty_like(inputs.d_weight)
        order = setup.vocab_order if vocab_order else None
        weight = setup.weight_by_column if vocab_order else setup.weight
        self.launches = {
            "d_hidden": d_hidden_kept_launch(self.d_hidden, inputs.d_logits, weight, kept_cols, kept_col_count,
                                             setup.map_tile, blocks["d_hidden"], order),
            "d_weight": d_weight_kept_launch(self.d_weight, inputs.d_logits, setup.hidden, kept_rows, kept_row_count,
                                             setup.map_tile, blocks["d_weight"], False, order),
        }

    def errors(self) -> dict[str, float]:
        """Runs both products once (compiling them) and returns their relative errors against cuBLAS's results."""
        for launch in self.launches.values():
            launch.run()
        # Through the order, d_logits column j writes d_weight row vocab_order[j]: row j of the dense result.
        d_weight = self.d_weight[self.setup.vocab_order.long()] if self.vocab_order else self.d_weight
        return {"d_hidden_rel_err": relative_error(self.d_hidden, self.inputs.d_hidden),
                "d_weight_rel_err": relative_error(d_weight, self.inputs.d_weight)}

    def times_ms(self) -> dict[str, float]:
        return {p: time_ms(self.launches[p].run, self.setup.device) for p in PRODUCTS}


def timing_record(setup: Setup, inputs: ShareInputs, variant: str, parts_ms: dict[str, float], **fields) -> dict:
    """A variant's record: its parts' medians (each timed alone), their sum `ms`, and useful TFLOP/s,
    4 C H V x kept share / ms."""
    record = {**inputs.fields(), "variant": variant, "status": "ok", **fields,
              **{f"{part}_ms": ms for part, ms in parts_ms.items()}}
    record["ms"] = sum(parts_ms.values())
    record["useful_tflops"] = setup.shape.dense_flops * record["kept_share"] / record["ms"] / 1e9
    return record


def error_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def measure_share(setup: Setup, inputs: ShareInputs) -> tuple[list[dict], float]:
    """The records of cuBLAS and of the launcher's kept-tile products in both vocabulary orders for one share, and
    the time of kept_tiles (map -> lists), which every kept variant counts. A launcher's variant that raises is
    recorded with status "failed" and the reason, so that the run keeps cuBLAS's times and says what broke."""
    d_hidden, d_weight = torch.empty_like(inputs.d_hidden), torch.empty_like(inputs.d_weight)
    cublas_ms = {
        "d_hidden": time_ms(lambda: torch.mm(inputs.d_logits, setup.weight, out=d_hidden), setup.device),
        "d_weight": time_ms(lambda: torch.mm(inputs.d_logits.T, setup.hidden, out=d_weight), setup.device),
    }
    records = [timing_record(setup, inputs, "cublas", cublas_ms)]
    lists_ms = time_ms(lambda: kept_tiles(inputs.tile_skipped), setup.device)
    blocks = setup.kept_blocks()
    fields = {"blocks": {p: asdict(b) for p, b in blocks.items()}}
    for variant, vocab_order in (("kept", False), ("kept_vocab_order", True)):
        try:
            products = KeptProducts(setup, inputs, blocks, vocab_order)
            errors = products.errors()
            parts = {"kept_tiles": lists_ms, **products.times_ms()}
        except Exception as error:  # the launcher's own blocks: a failure, reported beside what was measured
            records.append({**inputs.fields(), "variant": variant, **fields, "status": "failed",
                            "reason": error_line(error)})
            continue
        records.append(timing_record(setup, inputs, variant, parts, **errors, **fields))
    return records, lists_ms


def measure_candidate(setup: Setup, candidate: KeptProductBlocks, shares: list[ShareInputs],
                      lists_ms: dict[float, float]) -> list[dict]:
    """An alternative's records over every share, through the vocabulary order. A candidate that does not build or
    launch on this device gives one record per share with status "skipped" and the reason."""
    blocks = setup.kept_blocks(candidate)
    fields = {"candidate": blocks_text(candidate), "blocks": {p: asdict(b) for p, b in blocks.items()}}
    records = []
    for inputs in shares:
        try:
            products = KeptProducts(setup, inputs, blocks, vocab_order=True)
            errors = products.errors()
            parts = {"kept_tiles": lists_ms[inputs.share], **products.times_ms()}
        except Exception as error:  # out of shared memory or registers on this GPU: a finding, not a failure
            return [{**s.fields(), "variant": "kept_candidate", **fields, "status": "skipped",
                     "reason": error_line(error)} for s in shares]
        records.append(timing_record(setup, inputs, "kept_candidate", parts, **errors, **fields))
    return records


def add_ratios(records: list[dict]) -> None:
    """ratio_vs_cublas on every timed record: its ms over the cuBLAS record's of the same share."""
    cublas = {r["share"]: r["ms"] for r in records if r["variant"] == "cublas"}
    for record in records:
        if record["status"] == "ok":
            record["ratio_vs_cublas"] = record["ms"] / cublas[record["share"]]


def run_benchmark(shape: ChunkShape, dtype: torch.dtype, device: torch.device, shares: list[float], seed: int,
                  candidates: tuple[KeptProductBlocks, ...], deadline: float,
                  save: Callable[[list[dict], dict], None]) -> None:
    """Every share's cuBLAS and launcher records first, then the candidates one by one while time.perf_counter() is
    before `deadline` (the others are recorded skipped). save(records, setup_fields) is called after each of these
    stages with every record so far, ratios added, so that a run stopped from outside keeps what it measured."""
    generator = torch.Generator(device).manual_seed(seed)
    setup = make_setup(shape, dtype, generator)
    setup_fields = {"map_tile": list(setup.map_tile),
                    "tile_grid": list(d_logits_grid(shape.rows, shape.vocab_size, setup.map_blocks)),
                    "launcher_blocks": {p: asdict(b) for p, b in setup.kept_blocks().items()}}
    records, lists_ms = [], {}
    # The backward's setting: cuBLAS keeps every partial sum of a 16-bit product in fp32.
    with fp32_partial_sums():
        inputs = [make_share(setup, share, generator) for share in shares]
        for share_inputs in inputs:
            share_records, lists_ms[share_inputs.share] = measure_share(setup, share_inputs)
            records += share_records
        add_ratios(records)
        save(records, setup_fields)
        launcher = setup.kept_blocks()
        for candidate in candidates:
            if setup.kept_blocks(candidate) == launcher:
                continue
            if time.perf_counter() >= deadline:
                records += [{**s.fields(), "variant": "kept_candidate", "candidate": blocks_text(candidate),
                             "status": "skipped", "reason": "not started: the run reached its --time-limit-s"}
                            for s in inputs]
                continue
            records += measure_candidate(setup, candidate, inputs, lists_ms)
            add_ratios(records)
            save(records, setup_fields)
    save(records, setup_fields)
