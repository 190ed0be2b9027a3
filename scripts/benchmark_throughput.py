"""The old name of python -m benchmarks.throughput."""
from benchmarks.harness import moved
moved("benchmarks.throughput", __file__)
