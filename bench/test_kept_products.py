"""bench.kept_products without a GPU: its dry run under the Triton interpreter, its tile maps, its crossover and its
arguments.

Run: .venv/bin/python -m pytest bench/test_kept_products.py. The dry runs are processes of their own, since the
interpreter must be chosen before dama_kernels is first imported; the rest runs here and launches no kernel, and
imports dama_kernels only within the tests that use it, so that collecting this file chooses nothing for the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.kept_products import (
    DEFAULT_SHARES,
    crossover_share,
    describe_crossover,
    fastest_points,
    format_table,
    main,
    parse_args,
)

from .environment import REPO_ROOT

# Both products round an fp32 sum once to bf16: cuBLAS on the CPU to nearest, the interpreter toward zero, so an
# entry may differ by up to 1.5 units in the last place (2^-7 of the largest entry at most for each unit).
BF16_TOLERANCE = 2.0**-6
FP32_TOLERANCE = 1e-5
GPU_MAP_TILES = ((128, 128), (128, 256))


def dry_run(tmp_path, *arguments: str) -> tuple[dict, str]:
    """Runs `python -m bench.kept_products --dry-run` with arguments; returns its records file and stdout."""
    output = tmp_path / "kept_products.json"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.kept_products", "--dry-run", "--output", str(output),
                           *arguments], cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(output.read_text()), done.stdout


def test_dry_run_records_every_share_and_agrees_with_cublas(tmp_path) -> None:
    run, stdout = dry_run(tmp_path, "--candidates", "1")
    assert run["dry_run"] is True and (run["C"], run["H"], run["V"], run["dtype"]) == (150, 40, 300, "bf16")
    assert run["map_tile"] == [64, 128] and run["tile_grid"] == [3, 3] and run["git_commit"]
    variants = ("cublas", "kept", "kept_vocab_order", "kept_candidate")
    records = {(r["share"], r["variant"]): r for r in run["records"]}
    assert set(records) == {(share, variant) for share in DEFAULT_SHARES for variant in variants}
    for (share, variant), record in records.items():
        assert record["status"] == "ok" and record["tiles"] == 9 and record["tiles_kept"] == round(share * 9)
        assert record["ms"] > 0 and record["useful_tflops"] > 0
        if variant == "cublas":
            assert record["ratio_vs_cublas"] == 1.0
        else:
            assert record["kept_tiles_ms"] > 0
            assert record["d_hidden_rel_err"] <= BF16_TOLERANCE and record["d_weight_rel_err"] <= BF16_TOLERANCE
    assert records[(1.0, "kept_candidate")]["candidate"] == "128x128x64 w8 s4"
    assert stdout.splitlines()[-1] == f"conclusion: {run['conclusion']}"
    assert run["conclusion_fastest_blocks"] and f"fastest blocks: {run['conclusion_fastest_blocks']}" in stdout
    assert "crossover_share" in run and "crossover_share_fastest_blocks" in run and "kept_vocab_order" in stdout


def test_dry_run_in_fp32_and_past_its_time_limit(tmp_path) -> None:
    run, stdout = dry_run(tmp_path, "--dtype", "fp32", "--shares", "0.5", "--time-limit-s", "0")
    timed = [r for r in run["records"] if r["variant"] != "kept_candidate"]
    assert [r["variant"] for r in timed] == ["cublas", "kept", "kept_vocab_order"]
    for record in timed[1:]:
        assert record["d_hidden_rel_err"] <= FP32_TOLERANCE and record["d_weight_rel_err"] <= FP32_TOLERANCE
    candidates = [r for r in run["records"] if r["variant"] == "kept_candidate"]
    assert len(candidates) == 6 and {r["status"] for r in candidates} == {"skipped"}
    assert candidates[0]["reason"] == "not started: the run reached its --time-limit-s"
    assert "skipped: not started" in stdout and run["conclusion_fastest_blocks"] is None


def test_tile_map_keeps_exactly_the_share_asked() -> None:
    from bench.kept_products_timing import ChunkShape, masked_d_logits, random_tile_map

    for row_tiles, vocab_tiles in ((16, 126), (3, 3), (1, 7)):
        for share in (*DEFAULT_SHARES, 0.33, 0.01):
            tile_skipped = random_tile_map(row_tiles, vocab_tiles, share, torch.Generator().manual_seed(1))
            assert tile_skipped.shape == (row_tiles, vocab_tiles) and tile_skipped.dtype == torch.int32
            assert set(tile_skipped.unique().tolist()) <= {0, 1}
            assert int((tile_skipped == 0).sum()) == round(share * row_tiles * vocab_tiles)
    first, second = (random_tile_map(16, 126, 0.5, torch.Generator().manual_seed(seed)) for seed in (1, 2))
    assert not torch.equal(first, second)
    assert torch.equal(first, random_tile_map(16, 126, 0.5, torch.Generator().manual_seed(1)))

    tile_skipped = random_tile_map(3, 3, 0.5, torch.Generator().manual_seed(0))
    d_logits = masked_d_logits(tile_skipped, (64, 128), ChunkShape(150, 40, 300), torch.bfloat16,
                               torch.Generator().manual_seed(0))
    assert d_logits.shape == (150, 300) and d_logits.dtype == torch.bfloat16
    for row_tile in range(3):
        for vocab_tile in range(3):
            tile = d_logits[64 * row_tile: 64 * (row_tile + 1), 128 * vocab_tile: 128 * (vocab_tile + 1)]
            assert bool((tile == 0).all()) == bool(tile_skipped[row_tile, vocab_tile])


def test_candidate_blocks_divide_every_gpu_map_tile() -> None:
    from bench.kept_products_timing import CANDIDATE_BLOCKS, PRODUCTS
    from dama_kernels.launch_config import KEPT_PRODUCT_BLOCKS, fit_to_map
    from dama_kernels.linear_logprob_kept_tiles import check_kept_blocks

    assert 0 < len(CANDIDATE_BLOCKS) <= 6 and len(set(CANDIDATE_BLOCKS)) == len(CANDIDATE_BLOCKS)
    assert KEPT_PRODUCT_BLOCKS[2] not in CANDIDATE_BLOCKS
    for candidate in CANDIDATE_BLOCKS:
        for map_tile in GPU_MAP_TILES:
            for product in PRODUCTS:
                assert fit_to_map(candidate, product, map_tile) == candidate
                check_kept_blocks(candidate, *map_tile, product)


def test_a_candidate_that_cannot_launch_is_skipped_with_its_reason() -> None:
    from bench.kept_products_timing import ChunkShape, make_setup, make_share, measure_candidate
    from dama_kernels.launch_config import KeptProductBlocks

    generator = torch.Generator().manual_seed(0)
    setup = make_setup(ChunkShape(150, 40, 300), torch.float32, generator)
    shares = [make_share(setup, share, generator) for share in (1.0, 0.5)]
    # 96 rows of output do not divide the map's 128 words: d_weight's launch refuses it before anything runs.
    candidate = KeptProductBlocks(block_out=96, block_hidden=64, block_k=64)
    records = measure_candidate(setup, candidate, shares, {1.0: 0.0, 0.5: 0.0})
    assert [(r["share"], r["status"]) for r in records] == [(1.0, "skipped"), (0.5, "skipped")]
    assert records[0]["candidate"] == "96x64x64 w4 s1"
    assert records[0]["reason"].startswith("ValueError: d_weight blocks")


def test_a_launcher_variant_that_raises_is_recorded_failed_beside_cublas(monkeypatch) -> None:
    from bench import kept_products_timing as timing

    def broken(self) -> dict:
        raise RuntimeError("out of resources: shared memory\nmore detail")

    monkeypatch.setattr(timing.KeptProducts, "errors", broken)
    generator = torch.Generator().manual_seed(0)
    setup = timing.make_setup(timing.ChunkShape(150, 40, 300), torch.float32, generator)
    records, lists_ms = timing.measure_share(setup, timing.make_share(setup, 0.5, generator))
    assert [(r["variant"], r["status"]) for r in records] == [("cublas", "ok"), ("kept", "failed"),
                                                               ("kept_vocab_order", "failed")]
    assert records[1]["reason"] == "RuntimeError: out of resources: shared memory" and lists_ms > 0
    timing.add_ratios(records)
    table = format_table(records)
    assert "failed: RuntimeError: out of resources" in table and table.count("failed:") == 2


def test_crossover_is_interpolated_where_the_ratio_crosses_one() -> None:
    points = [(1.0, 1.4), (0.75, 1.2), (0.5, 0.9), (0.25, 0.6), (0.1, 0.4)]
    assert crossover_share(points) == pytest.approx(0.5 + 0.1 / 0.3 * 0.25)
    assert crossover_share(list(reversed(points))) == crossover_share(points)  # order of the points does not matter
    assert crossover_share([(1.0, 1.0), (0.5, 0.5)]) == 1.0
    assert crossover_share([(1.0, 2.0), (0.1, 1.1)]) is None
    assert crossover_share([(1.0, 0.9), (0.1, 0.2)]) is None
    assert crossover_share([(0.5, 0.8)]) is None and crossover_share([]) is None

    line = describe_crossover(points, "kept")
    assert line.startswith("crossover at a kept share of 0.58: kept beat cuBLAS below it")
    assert "1.40x cuBLAS's time at share 1" in line and "0.40x cuBLAS's time at share 0.1" in line
    assert describe_crossover([(1.0, 2.0), (0.1, 1.1)], "kept").startswith("no crossover: cuBLAS beats kept at every")
    assert describe_crossover([(1.0, 0.9), (0.1, 0.2)], "kept").startswith("no crossover: kept beat cuBLAS at every")

    records = [{"share": share, "ratio_vs_cublas": ratio, "variant": variant, "status": "ok"}
               for variant, ratios in (("kept_vocab_order", (1.4, 0.6)), ("kept_candidate", (1.1, 0.7)),
                                       ("kept", (0.1, 0.1)))
               for share, ratio in zip((1.0, 0.25), ratios, strict=True)]
    assert fastest_points(records) == [(0.25, 0.6), (1.0, 1.1)]


@pytest.mark.parametrize("shares", [["1.5"], ["0"], ["-0.1"], ["nan"], ["half"], ["0.5", "0.5"]])
def test_bad_shares_are_refused_with_a_clear_message(shares, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--shares", *shares])
    assert exit_info.value.code == 2
    assert "--shares" in capsys.readouterr().err


def test_arguments() -> None:
    args = parse_args([])
    assert (args.shares, args.dtype, args.candidates, args.dry_run) == (list(DEFAULT_SHARES), "bf16", None, False)
    assert args.output.name == "kept_products.json"
    assert parse_args(["--dry-run"]).output.name == "kept_products_dry_run.json"
    assert parse_args(["--shares", "0.3", "1"]).shares == [0.3, 1.0]
    with pytest.raises(SystemExit):
        parse_args(["--candidates", "-1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_a_gpu(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--output", str(tmp_path / "records.json")]) == 1
    message = capsys.readouterr().err
    assert "no CUDA device is visible" in message and "--dry-run" in message and message.count("\n") == 1
    assert not list(tmp_path.iterdir())
