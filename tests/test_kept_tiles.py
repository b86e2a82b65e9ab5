"""The filtered backward's gradient products over kept d_logits tiles, against float64 products of the same tiles.

The d_logits given to the kernels hold NaN in every filtered tile and the outputs start as NaN: a kernel that reads
a filtered tile, or leaves an element unwritten, returns NaN there. Shapes are not multiples of any block (masked
tails); the maps hold a row tile with every tile filtered and one with none (d_hidden), or a vocabulary tile filtered
in every row tile (d_weight).
"""

from __future__ import annotations

import pytest
import torch

from dama_kernels.launch_config import INTERPRETER_KEPT_BLOCKS, KeptProductBlocks, fit_to_map, kept_product_blocks
from dama_kernels.linear_logprob_kept_tiles import d_hidden_kept_launch, d_weight_kept_launch, kept_tiles

# 150 rows = 3 row tiles of 64 (the last short); 300 words = 3 vocabulary tiles of 128 (the last short); H 40.
MAP_TILE = (64, 128)
NUM_ROWS, VOCAB_SIZE, HIDDEN_SIZE = 150, 300, 40
# The interpreter's blocks (one K step per tile), and small ones: several output tiles and K steps per map tile.
SMALL_BLOCKS = KeptProductBlocks(block_out=32, block_hidden=16, block_k=32)
BLOCKS = {
    "interpreter": lambda product: fit_to_map(INTERPRETER_KEPT_BLOCKS[product], product, MAP_TILE),
    "small": lambda product: SMALL_BLOCKS,
}
# Errors against the float64 product, relative to its largest element: fp32 products; 16-bit outputs rounded once
# (toward zero under the interpreter: one unit in the last place, 2^-7 for bf16).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def tile_map(product: str) -> torch.Tensor:
    """(3, 3) int32, otherwise random: for d_hidden row tile 0 filters everything and row tile 1 nothing; for d_weight
    vocabulary tile 2 is filtered in every row tile and vocabulary tile 0 in none."""
    tile_skipped = torch.randint(0, 2, (3, 3), dtype=torch.int32)
    if product == "d_hidden":
        tile_skipped[0], tile_skipped[1] = 1, 0
    else:
        tile_skipped[:, 2], tile_skipped[:, 0] = 1, 0
    return tile_skipped


def element_mask(tile_skipped: torch.Tensor) -> torch.Tensor:
    """(NUM_ROWS, VOCAB_SIZE) bool, True in filtered tiles."""
    expanded = tile_skipped.bool().repeat_interleave(MAP_TILE[0], 0).repeat_interleave(MAP_TILE[1], 1)
    return expanded[:NUM_ROWS, :VOCAB_SIZE]


def make_d_logits(dtype: torch.dtype, device, product: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_logits with NaN in filtered tiles, the same with zeros there in float64, tile map)."""
    tile_skipped = tile_map(product)
    filtered = element_mask(tile_skipped)
    d_logits = torch.randn(NUM_ROWS, VOCAB_SIZE).to(dtype)
    gold_d_logits = d_logits.double().masked_fill(filtered, 0.0)
    return d_logits.masked_fill(filtered, float("nan")).to(device), gold_d_logits, tile_skipped.to(device)


def assert_close_to(actual: torch.Tensor, gold: torch.Tensor, dtype: torch.dtype) -> None:
    assert bool(torch.isfinite(actual).all()), "an element unwritten, or a filtered tile read"
    scale = gold.abs().max().item() or 1.0
    error = (actual.double().cpu() - gold).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} > {TOLERANCE[dtype]:.3g} x {scale:.3g}"


def test_kept_tiles_lists_each_tiles_kept_partners_first_and_in_order():
    tile_skipped = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.int32)
    kept_cols, kept_col_count, kept_rows, kept_row_count = kept_tiles(tile_skipped)
    assert kept_col_count.tolist() == [2, 4, 0]
    assert kept_cols[0, :2].tolist() == [1, 3] and kept_cols[1].tolist() == [0, 1, 2, 3]
    assert kept_row_count.tolist() == [1, 2, 1, 2]
    assert [kept_rows[t, : kept_row_count[t]].tolist() for t in range(4)] == [[1], [0, 1], [1], [0, 1]]
    assert all(t.dtype == torch.int32 for t in (kept_cols, kept_col_count, kept_rows, kept_row_count))


def word_order(sorted_vocab: bool) -> torch.Tensor | None:
    """A random vocabulary order (the word of each d_logits column), int32, or None for the vocabulary's own."""
    return torch.randperm(VOCAB_SIZE).to(torch.int32) if sorted_vocab else None


@pytest.mark.parametrize("sorted_vocab", [False, True], ids=["vocab order", "sorted"])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_d_hidden_multiplies_only_kept_tiles(blocks, dtype, sorted_vocab, device):
    d_logits, gold_d_logits, tile_skipped = make_d_logits(dtype, device, "d_hidden")
    weight = torch.randn(VOCAB_SIZE, HIDDEN_SIZE).to(dtype)
    d_hidden = torch.full((NUM_ROWS, HIDDEN_SIZE), float("nan"), dtype=dtype, device=device)
    kept_cols, kept_col_count, _, _ = kept_tiles(tile_skipped)
    order = word_order(sorted_vocab)
    d_hidden_kept_launch(d_hidden, d_logits, weight.to(device), kept_cols, kept_col_count, MAP_TILE,
                         BLOCKS[blocks]("d_hidden"), None if order is None else order.to(device)).run()
    gold = gold_d_logits @ (weight.double() if order is None else weight.double()[order.long()])
    assert_close_to(d_hidden, gold, dtype)
    assert bool((d_hidden[: MAP_TILE[0]] == 0).all())  # the row tile that filtered everything


@pytest.mark.parametrize("sorted_vocab", [False, True], ids=["vocab order", "sorted"])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype, out_dtype, accumulate", [
    (torch.float32, torch.float32, False),
    (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.bfloat16, torch.float32, True),  # the fp32 accumulator of many chunks of 16-bit inputs
], ids=str)
def test_d_weight_multiplies_only_kept_tiles(blocks, dtype, out_dtype, accumulate, sorted_vocab, device):
    d_logits, gold_d_logits, tile_skipped = make_d_logits(dtype, device, "d_weight")
    hidden = torch.randn(NUM_ROWS, HIDDEN_SIZE).to(dtype)
    previous = torch.randn(VOCAB_SIZE, HIDDEN_SIZE).to(out_dtype)
    d_weight = previous.clone() if accumulate else torch.full_like(previous, float("nan"))
    _, _, kept_rows, kept_row_count = kept_tiles(tile_skipped)
    d_weight = d_weight.to(device)
    order = word_order(sorted_vocab)
    d_weight_kept_launch(d_weight, d_logits, hidden.to(device), kept_rows, kept_row_count, MAP_TILE,
                         BLOCKS[blocks]("d_weight"), accumulate, None if order is None else order.to(device)).run()
    product = gold_d_logits.T @ hidden.double()  # (V, H), row j for d_logits column j
    words = torch.arange(VOCAB_SIZE) if order is None else order.long()
    gold = torch.empty_like(product).index_copy_(0, words, product) + (previous.double() if accumulate else 0.0)
    assert d_weight.dtype == out_dtype
    assert_close_to(d_weight, gold, out_dtype)
    if not accumulate:  # the words of the vocabulary tile filtered in every row tile get zeros
        assert bool((d_weight.cpu()[words[2 * MAP_TILE[1]:]] == 0).all())


@pytest.mark.parametrize("product", ["d_hidden", "d_weight"])
def test_blocks_that_straddle_map_tiles_are_refused(product, device):
    d_logits, _, tile_skipped = make_d_logits(torch.float32, device, product)
    operand = torch.randn(NUM_ROWS if product == "d_weight" else VOCAB_SIZE, HIDDEN_SIZE, device=device)
    too_wide = KeptProductBlocks(block_out=256, block_hidden=16, block_k=256)
    lists = kept_tiles(tile_skipped)
    with pytest.raises(ValueError, match="do not divide the tile map"):
        if product == "d_hidden":
            d_hidden_kept_launch(torch.empty(NUM_ROWS, HIDDEN_SIZE), d_logits, operand, *lists[:2], MAP_TILE,
                                 too_wide)
        else:
            d_weight_kept_launch(torch.empty(VOCAB_SIZE, HIDDEN_SIZE), d_logits, operand, *lists[2:], MAP_TILE,
                                 too_wide, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("map_tile", [(128, 256), (128, 128), (64, 128)])
def test_gpu_blocks_lie_within_the_map_tiles(dtype, map_tile):
    for product in ("d_hidden", "d_weight"):
        blocks = kept_product_blocks(product, dtype, map_tile)
        out_tile, k_tile = map_tile if product == "d_hidden" else map_tile[::-1]
        assert out_tile % blocks.block_out == 0 and k_tile % blocks.block_k == 0
