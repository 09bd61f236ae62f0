"""Load-time validation of a compressed checkpoint: the plugin's name for the format's one validator.

The plugin's `load_weights` passes vLLM's weight iterator through `CompressedCheckpointValidator.inspect`
(every tensor of a decomposed MoE layer is checked as it streams past, before vLLM copies it anywhere)
and calls `finish()` once everything streamed. The checks themselves live in
`moesvd_vllm.format.validator` (the pre-flight, the PyTorch reference and the writer use the same ones).
"""

from __future__ import annotations

from moesvd_vllm.format.validator import CheckpointMismatchError, CheckpointValidator

# constructor (model_type, config, dims, layer_indices), .inspect(weights), .check(name, shape, dtype), .finish()
CompressedCheckpointValidator = CheckpointValidator

__all__ = ["CheckpointMismatchError", "CompressedCheckpointValidator"]
