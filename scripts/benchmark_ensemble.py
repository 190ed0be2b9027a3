"""The old name of python -m benchmarks.ensemble_cost."""
from benchmarks.harness import moved
moved("benchmarks.ensemble_cost", __file__)
