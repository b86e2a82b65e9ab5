"""The scoring benchmark runs end to end at a hundredth of the benchmarks' sizes."""

from bench.scoring import run


def test_scoring_benchmark_runs_small():
    results = run(scale=100)
    assert [(name, result["items"]) for name, result in results.items()] == [
        ("Object HalBench", 3), ("POPE", 90), ("AMBER", 152)]
    assert all(result["seconds"] > 0 for result in results.values())
