"""Run a Hugging Face MoE model one decoder layer at a time (the sequential calibration pipeline).

Only one decoder layer's weights are in memory at once: the layer module is built on the meta device from
the transformers class of the model type and its tensors are streamed from the shards. Embeddings,
rotary position embeddings and the causal/padding mask are computed exactly as the HF model's
`forward` computes them, so the hidden states passed from layer to layer equal the full model's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moesvd_vllm.architectures import MoEDims, module_moe_block, moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.format.safetensors_io import verify_weight_files
from moesvd_vllm.format.directories import read_config
from offline.checkpoint_io import CheckpointError, disk_name, layer_state_dict
from offline.expert_tensors import CheckpointTensors, read_fused_experts

logger = logging.getLogger(__name__)

_FUSED_EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")  # transformers 5's routed experts


@dataclass
class LayerInputs:
    """The inputs every decoder layer needs besides the hidden states, for one batch."""

    attention_mask: torch.Tensor | None  # [B, L] 1 = real token, 0 = padding (the 2-D user mask)
    layer_masks: dict[str, object]  # attention-mask kind ("full_attention"/"sliding_attention") -> mask
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    return config


def default_compute_dtype(expert_dtype: str) -> torch.dtype:
    """bfloat16 for bf16 checkpoints (as they run in HF and vLLM; a float32 copy of a 128-expert
    Qwen3-30B-A3B layer alone would be 2x its stored bytes), float32 otherwise (fp16 overflows more
    easily on CPU; float32 checkpoints keep their precision)."""
    return torch.bfloat16 if expert_dtype == "bfloat16" else torch.float32


class LayerwiseModel:
    """A checkpoint read lazily; builds embeddings, masks and one decoder layer at a time.

    `compute_dtype`: the dtype the layers run in; by default `default_compute_dtype` of the experts'
    stored dtype. `device`: where the built layers, embeddings and masks live (offline/devices.py)."""

    def __init__(self, model_dir: str | os.PathLike, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model_dir = Path(model_dir)
        self.raw_config = read_config(self.model_dir)
        self.model_type = self.raw_config.get("model_type", "")
        moe_layout(self.model_type)  # unknown / non-MoE architectures fail here with a clear message
        verify_weight_files(self.model_dir)
        self.tensors = CheckpointTensors(self.model_dir)
        self.dims: MoEDims = moe_dims(self.raw_config)
        self.moe_layers: list[int] = moe_layer_indices(self.raw_config)
        self.num_layers = int(self.raw_config["num_hidden_layers"])
        self.compute_dtype = compute_dtype or default_compute_dtype(self.expert_dtype())
        self.config = _hf_config(self.model_dir)
        self._skeleton = self._meta_model()
        self._rotary = type(self._skeleton.model.rotary_emb)(config=self.config).to(self.device)
        self._moe_attribute = module_moe_block(self.model_type, 0).removeprefix("model.layers.0.")

    def _meta_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config)

    # ----------------------------------------------------------------------------------- model inputs
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.tensors.get("model.embed_tokens.weight").to(self.device, self.compute_dtype)
        return nn.functional.embedding(input_ids.to(self.device), weight)

    def layer_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> LayerInputs:
        """Position ids, rotary embeddings and masks as the HF model's forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden.device)
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                      past_key_values=None, position_ids=position_ids)
        masks: dict[str, object] = {"full_attention": create_causal_mask(**kwargs)}
        if getattr(self.config, "sliding_window", None) is not None:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        if "linear_attention" in (getattr(self.config, "layer_types", None) or ()):  # qwen3_next
            from transformers.masking_utils import create_recurrent_attention_mask

            masks["linear_attention"] = create_recurrent_attention_mask(**kwargs)
        with torch.no_grad():
            position_embeddings = self._rotary(hidden, position_ids)
        return LayerInputs(attention_mask, masks, position_ids, position_embeddings)

    def mask_for_layer(self, inputs: LayerInputs, layer_index: int):
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return inputs.layer_masks[layer_types[layer_index]]
        if "sliding_attention" in inputs.layer_masks:
            return inputs.layer_masks["sliding_attention"]
        return inputs.layer_masks["full_attention"]

    # ----------------------------------------------------------------------------------- layers
    def build_layer(self, layer_index: int) -> nn.Module:
        """The decoder layer `layer_index` with its weights loaded (in `compute_dtype`)."""
        layer_cls = type(self._skeleton.model.layers[layer_index])
        with torch.device("meta"):
            layer = layer_cls(self.config, layer_index)
        keys = list(layer.state_dict().keys())
        expert_keys = [k for k in keys if k.endswith(_FUSED_EXPERT_KEYS)]
        dims = self.dims if layer_index in self.moe_layers else None
        state = layer_state_dict(self.tensors, self.model_type, layer_index,
                                 [k for k in keys if k not in expert_keys], dims)
        state = {k: v.to(self.device, self.compute_dtype) for k, v in state.items()}
        if expert_keys:  # read straight into the fused tensors, in the compute dtype (one copy)
            if dims is None:
                raise CheckpointError(f"layer {layer_index}: unexpected routed experts in a dense layer")
            gate_up, down = read_fused_experts(self.tensors, self.model_type, layer_index, dims,
                                               self.compute_dtype)
            gate_up, down = gate_up.to(self.device), down.to(self.device)
            state.update({k: gate_up if k.endswith(_FUSED_EXPERT_KEYS[0]) else down for k in expert_keys})
        layer.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, b in layer.named_buffers() if b.is_meta]
        if leftover:
            raise CheckpointError(
                f"layer {layer_index}: buffers {leftover} are not stored in the checkpoint; this "
                f"{self.model_type} layer class is not supported by the layer-wise pipeline")
        return layer.eval()

    def moe_block(self, layer: nn.Module) -> nn.Module:
        """The MoE block of a decoder layer built by `build_layer` (transformers' module path)."""
        return layer.get_submodule(self._moe_attribute)

    def run_layer(self, layer: nn.Module, layer_index: int, hidden: torch.Tensor,
                  inputs: LayerInputs) -> torch.Tensor:
        with torch.no_grad():
            out = layer(hidden, attention_mask=self.mask_for_layer(inputs, layer_index),
                        position_ids=inputs.position_ids, position_embeddings=inputs.position_embeddings,
                        use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    # ----------------------------------------------------------------------------------- head
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (used by tests to compare with the full HF model)."""
        norm = type(self._skeleton.model.norm)(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.load_state_dict({"weight": self.tensors.get("model.norm.weight").to(self.compute_dtype)})
        norm = norm.to(hidden.device)
        head_name = "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"
        head = self.tensors.get(head_name).to(hidden.device, self.compute_dtype)
        with torch.no_grad():
            return nn.functional.linear(norm(hidden), head)

    def non_layer_tensor_names(self) -> list[str]:
        """Tensors outside the decoder layers the pipeline runs, copied unchanged: embeddings, final norm,
        head, and layers past num_hidden_layers (DeepSeek-V3 / GLM-4.5 multi-token-prediction layers,
        `num_nextn_predict_layers`, stored as model.layers.<num_hidden_layers + j>.*)."""
        return [n for n in self.tensors.names() if not n.startswith("model.layers.")
                or int(n.split(".")[2]) >= self.num_layers]

    def layer_tensor_names(self, layer_index: int) -> list[str]:
        prefix = f"model.layers.{layer_index}."
        return [n for n in self.tensors.names() if n.startswith(prefix)]

    def router_disk_name(self, layer_index: int) -> str:
        return moe_layout(self.model_type).router_weight(layer_index)

    def expert_dtype(self) -> str:
        """Dtype of the stored expert weights (the dtype the compressed factors keep)."""
        first = self.moe_layers[0]
        for name in self.layer_tensor_names(first):
            if ".experts." in name:
                return self.tensors.dtype(name)
        raise CheckpointError(f"layer {first}: no routed expert tensors found")


def disk_name_of(model: LayerwiseModel, layer_index: int, key: str) -> str:
    return disk_name(model.model_type, layer_index, key)
