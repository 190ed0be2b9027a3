"""The old name of python -m benchmarks.gpu_check."""
from benchmarks.harness import moved
moved("benchmarks.gpu_check", __file__)
