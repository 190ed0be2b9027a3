"""The old name of python -m benchmarks.shard_builder --parts scale."""
from benchmarks.harness import moved
moved("benchmarks.shard_builder", __file__, ("--parts", "scale"), {"--images": "--scale-images", "--small": "--scale-small"})
