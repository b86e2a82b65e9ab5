"""The row check of a `dama train` start, first run against a second run on the same files (its stored verdict).

Writes a synthetic training parquet (default 83,000 pairs, RLAIF-V's count, each with its own tiny PNG embedded),
then times dama.data.validation.check_input in two fresh processes in turn, counting the images each decodes. The
first checks every row and stores the verdict (dama.data.row_check_cache); the second should decode none. The
parquet -> Arrow conversion is timed apart ("load"), since datasets caches it on the first run either way.

Usage: python -m bench.row_check [--rows 83000] [--image-size 16] [--work-dir DIR] [--json bench/results/row_check.json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.environment import git_state


def write_pairs(path: Path, num_rows: int, image_size: int) -> None:
    """`num_rows` pairs, each with a distinct random PNG of image_size x image_size pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = random.Random(0)
    writer = None
    for start in range(0, num_rows, 5000):
        rows = []
        for index in range(start, min(start + 5000, num_rows)):
            buffer = io.BytesIO()
            Image.frombytes("RGB", (image_size, image_size), rng.randbytes(3 * image_size * image_size)).save(
                buffer, format="PNG")
            rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "question": f"What is in image {index}?",
                         "chosen": "A red square.", "rejected": "A blue circle.", "idx": index})
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def time_one_check(path: str, cache_dir: str) -> dict:
    """One `dama train`-like row check in this process: seconds to load, seconds to check, images decoded."""
    from dama.data import validation
    from dama.data.formats import load_preference_rows

    decoded = {"n": 0}
    original = validation.open_row_image

    def counting(*args, **kwargs):
        decoded["n"] += 1
        return original(*args, **kwargs)

    validation.open_row_image = counting
    start = time.perf_counter()
    load_preference_rows(path, cache_dir=cache_dir)
    loaded = time.perf_counter()
    checked = validation.check_input(path, validation.RowChecks(hardness=True), on_bad_row="error", skip_hint="",
                                     cache_dir=cache_dir)
    done = time.perf_counter()
    return {"load_s": round(loaded - start, 2), "check_s": round(done - loaded, 2), "decoded": decoded["n"],
            "kept": checked.report.kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=83_000, help="pairs in the synthetic parquet")
    parser.add_argument("--image-size", type=int, default=16, help="side of each pair's PNG, in pixels")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the parquet goes (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    parser.add_argument("--time-one-check", nargs=2, metavar=("PARQUET", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_one_check:
        print(json.dumps(time_one_check(*args.time_one_check)))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="row_check_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.parquet"
    start = time.perf_counter()
    write_pairs(path, args.rows, args.image_size)
    print(f"wrote {args.rows} pairs to {path} in {time.perf_counter() - start:.1f} s", flush=True)
    runs = []
    for name in ("first", "second"):
        command = [sys.executable, "-m", "bench.row_check", "--time-one-check", str(path), str(work / "cache")]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append({"run": name, **json.loads(output.strip().splitlines()[-1])})
        print(f"{name:6s} run: load {runs[-1]['load_s']:7.2f} s  check {runs[-1]['check_s']:7.2f} s  "
              f"images decoded {runs[-1]['decoded']}", flush=True)
    record = {"rows": args.rows, "image_size": args.image_size, "runs": runs, **git_state()}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
