"""llmem benchmarks: ``python -m bench`` runs the suite against llama.cpp and the baselines
(``--quick`` / ``--full``); ``python bench/bench_<topic>.py`` runs one older per-component breakdown."""
