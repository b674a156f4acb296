"""The benchmark harness: ``python -m loadtests.bench [--quick]`` (see docs/benchmark.md).

Modules: ``workload`` (the traffic), ``loadgen`` (open-loop generator), ``stack`` (the
processes and their CPU time), ``scenarios`` (what is compared), ``promstats`` (the
gateway's histograms), ``run`` (the ladder), ``report`` (markdown, plot, JSON).
"""
