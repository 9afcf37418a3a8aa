"""Benchmarks of lightning_pbt (not timed tests): ``python -m bench --help``; results in bench/results/."""
