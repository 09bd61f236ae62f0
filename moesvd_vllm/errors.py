"""The error classes users see: each message names the problem and the fix. Pure Python.

`MoESVDError` is the base a command-line entry point catches to print a clean error instead of a traceback.
"""

from __future__ import annotations


class MoESVDError(ValueError):
    """Base of every user-facing moesvd-vllm error."""


class SchemaError(MoESVDError):
    """The `moe_svd` block or the checkpoint does not match the schema."""


class ArchitectureError(SchemaError):
    """The model type or its config is not a supported Mixture-of-Experts architecture."""


class CheckpointError(MoESVDError):
    """A checkpoint's files or tensors are missing, damaged, or disagree with its config.json."""


class NonFiniteTensorError(CheckpointError):
    """A tensor about to be written holds NaN or Inf (the compressor never writes one)."""
