"""chunkcache: precompute each retrieved chunk's KV cache once, fuse them at question time."""

__version__ = "0.1.0"
