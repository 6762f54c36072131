"""Checkpoint I/O: lazy safetensors reading, streaming shard writing, atomic output folders."""
