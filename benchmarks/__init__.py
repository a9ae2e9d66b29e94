"""Speed, memory and MFU benchmarks of the stages (benchmarks/bench.py)."""
