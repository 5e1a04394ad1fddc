"""The sections of benchmarks/bench.py, one module each, and the helpers the benchmark scripts share.

- common: constants, the synthetic batch, medians and timings; workers: the worker processes (clean environment,
  mpiexec, this checkout's dpnet); exchange_step: the Solver's training step written with dpnet's public
  gradient-exchange protocol
- step, versus_torch, distributed (with distributed_worker), memory: the four sections; report: the table and the
  environment recorded with the results

Run from benchmarks/ (`python benchmarks/bench.py`, `python benchmarks/bench_phases.py`): the script's folder is then
first on sys.path, so `import bench_sections` finds this package. Nothing here touches dpnet beyond its public API.
"""
