"""The old name of python -m benchmarks.figures."""
from benchmarks.harness import moved
moved("benchmarks.figures", __file__)
