"""The measuring tools: each module is a command (``python -m benchmarks.NAME --help``) that backs a figure the
README or docs/BENCHMARKS.md quotes, and ``gpu_check`` is the first thing to run on a GPU machine. They share one
harness (``benchmarks.harness``). May import every product package; no product package imports benchmarks."""
