"""The compressed-checkpoint format: the one package `offline/` writes with and the plugin reads with.

- `schema`: the `moe_svd` block of config.json (dataclasses, validation, expected tensors, parameter counts).
- `safetensors_io`: the files of a checkpoint directory: one dtype table, headers via `safe_open`, shard
  listing, the sharded (spilling) writer.
- `directories`: output directories: the atomic partial directory, config.json and side files.
- `validator`: the one check of a compressed checkpoint's `(name, shape, dtype)` against its block.
- `writer`: the one writer of compressed checkpoints (plugin architecture, block, finite tensors, shards).
Architecture facts (layouts, MoE-layer rules, plugin names) live in `moesvd_vllm.architectures`.
Only `writer` (and `safetensors_io`'s tensor writing) imports torch, lazily.
"""
