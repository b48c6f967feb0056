"""llmem benchmarks (run one with ``python bench/bench_<topic>.py``)."""
