"""fastbert benchmarks: the harness (benchmarks.harness), results (benchmarks.report), one
bench_<op>.py per op, and the runner ``python -m benchmarks.run``. Results live in
benchmarks/results/<host-kind>.json and .csv."""
