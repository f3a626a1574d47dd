"""Side-by-side benchmarks of graphopt against its peers, one command: ``python -m bench``.

Every comparison runs in ONE process and ONE run: the systems of a case are built, checked for
quality against the baseline, warmed up, then timed in interleaved rounds (A, B, C, A, B, C, ...)
so that machine drift (thermal, another job starting) hits every system alike. Results are
ratios against a baseline with medians and spread (p10/p90), never lone absolute times, plus each
system's distance from the physical floor measured on the same machine in the same run.

Layout::

    bench/run.py        the command line (``python -m bench`` / ``python bench/run.py``)
    bench/harness.py    System, interleaved timing, statistics, the latency-case driver
    bench/systems.py    the systems themselves: torch eager/compile, ONNX Runtime peers, graphopt
    bench/floor.py      measured GEMM FLOP/s and memory bandwidth, analytic FLOP and byte counts
    bench/machine.py    the machine description stamped on every result
    bench/report.py     <case>.md, <case>.json and <case>.png
    bench/cases/        one module per case; each lists its graphopt pipelines in GRAPHOPT_PIPELINES
"""
