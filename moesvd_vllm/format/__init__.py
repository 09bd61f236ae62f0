"""The compressed-checkpoint format: the one package `offline/` writes with and the plugin reads with.

- `schema`: the `moe_svd` block of config.json (dataclasses, validation, expected tensors, parameter counts).
Architecture facts (layouts, MoE-layer rules, plugin names) live in `moesvd_vllm.architectures`.
"""
