"""The old name of python -m benchmarks.shard_builder."""
from benchmarks.harness import moved
moved("benchmarks.shard_builder", __file__)
