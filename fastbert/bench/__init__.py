"""fastbert's benchmark suite (``fastbert bench``, or ``python -m fastbert.bench.run``): the harness
(:mod:`fastbert.bench.harness`), one ``bench_<op>.py`` module of cases per op, the runner
(:mod:`fastbert.bench.run`), the results files and Markdown summary (:mod:`fastbert.bench.report`),
run-to-run comparison (:mod:`fastbert.bench.compare`) and plots (:mod:`fastbert.bench.plots`).

Results go to the folder named by ``--out`` (default ``./fastbert-bench-results``); a source
checkout keeps its committed results in ``benchmarks/results`` (``make bench``)."""
