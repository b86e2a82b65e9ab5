"""Benchmarks of the fused loss head against the implementations DPO trainers use; run as `python -m bench.<name>`."""
