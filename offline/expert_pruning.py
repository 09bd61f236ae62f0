"""Expert pruning, the baseline served by stock vLLM: the same number p of routed experts removed from every
MoE layer, the output a normal Hugging Face checkpoint of the same architecture with fewer experts.

    from offline.expert_pruning import ExpertPruningOptions, prune_experts
    report = prune_experts(model_dir, out_dir, ExpertPruningOptions(ratio=0.25, saliency="reap", calib="c.txt"))

or `moesvd prune-experts MODEL_DIR --out OUT --ratio 0.25 --saliency reap --calib c.txt`.

p = round(ratio * E), at least 1 and at most E - top_k (every token still finds top_k experts); the
achieved ratio p / E is in the report. Per layer the p experts of lowest saliency go, measured on the
calibration windows with the dense model (float32, one decoder layer at a time, `offline.layerwise`):

* "reap" (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE compression"):
  S_j = mean over the tokens routed to expert j of g_j(x) ||f_j(x)||_2, with g_j the routing weight the
  block hands its experts (renormalised over the top-k when the architecture does) and f_j(x) the expert's
  output;
* "frequency": the number of top-k assignments expert j receives.

The output keeps every tensor but the pruned experts': the kept experts are renumbered 0..E-p-1 in their
original order, the router keeps their rows, config.json's expert-count keys (the architecture table's
`MoELayout.num_experts_keys`) say E - p, shared experts (qwen2_moe) and everything else are copied, and
`expert_pruning.json` records saliencies, kept experts, achieved ratio and options.

Routing after pruning: the pruned router is the dense router restricted to the kept rows. With top-k
renormalisation (qwen3_moe / qwen2_moe / olmoe with norm_topk_prob=True, mixtral always) this computes
exactly what the dense model computes with the pruned experts' logits masked to -inf. Without it
(norm_topk_prob=False) the softmax denominator loses the pruned experts' terms, so each kept expert's
weight grows by the factor sum_all exp / sum_kept exp: the pruned model is then not the masked dense one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesvd_vllm.architectures import MoELayout, architecture, moe_dims, moe_layer_indices
from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.directories import atomic_directory, check_output_dir, copy_side_files, read_config, write_config
from moesvd_vllm.format.safetensors_io import ShardedSafetensorsWriter
from moesvd_vllm.options import from_mapping, option

logger = logging.getLogger(__name__)

SALIENCIES = ("reap", "frequency")
SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
REPORT_FILE = "expert_pruning.json"
METHOD = "expert-pruning"


class ExpertPruningError(MoESVDError):
    """Invalid expert-pruning options or a model expert pruning cannot handle."""


@dataclass(frozen=True)
class ExpertPruningOptions:
    """Options of `prune_experts` (recorded in expert_pruning.json)."""

    ratio: float = option(help="fraction of routed-expert parameters to remove, in (0, 1): the same "
                               "round(ratio * E) experts per MoE layer, e.g. 0.25")
    saliency: str = option(help="which experts go: 'reap' (mean routing weight x expert output norm over its "
                                "tokens, Lasby et al. 2025) or 'frequency' (top-k assignments)",
                           choices=SALIENCIES)
    calib: str = option(help="calibration text: a .txt/.jsonl file, a directory of them, or a `datasets` "
                             "name (needs network)")
    num_samples: int = option(64, "calibration windows")
    seq_len: int = option(256, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration sampling")
    force: bool = option(False, "replace an existing output directory")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertPruningOptions:
        """From a mapping; unknown keys fail with the known ones."""
        return from_mapping(cls, data, error=ExpertPruningError, what="expert-pruning option")

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ExpertPruningError(f"ratio must be strictly between 0 and 1 (e.g. 0.25), got {self.ratio!r}")
        if self.saliency not in SALIENCIES:
            raise ExpertPruningError(f"saliency {self.saliency!r} is not one of {SALIENCIES}")
        for name in ("num_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise ExpertPruningError(f"{name} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------ how many
def experts_to_prune(ratio: float, num_experts: int, top_k: int) -> int:
    """p = round(ratio * E), raised to 1; refused when it leaves fewer than top_k experts."""
    p = max(1, int(round(ratio * num_experts)))
    if num_experts - p < top_k:
        most = (num_experts - top_k) / num_experts
        raise ExpertPruningError(
            f"ratio {ratio} removes {p} of {num_experts} experts, leaving {num_experts - p} < top_k {top_k} "
            f"(experts per token); use a ratio of at most {most:.3f}")
    return p


# ------------------------------------------------------------------------------------------ saliency
class SaliencyHook:
    """Forward pre-hook on a transformers-5 fused `experts` module, called with (hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]): per expert the sum of g_j ||f_j(x)||, the routed tokens and
    the top-k assignments (padding excluded through `token_mask`)."""

    def __init__(self, experts: nn.Module, num_experts: int):
        self.experts = experts
        self.reap_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)
        self.assignments = torch.zeros(num_experts, dtype=torch.int64)
        self.token_mask: torch.Tensor | None = None
        self._handle = experts.register_forward_pre_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        hidden, index, weights = args[0], args[1], args[2]
        if self.token_mask is not None:
            mask = self.token_mask.reshape(-1).to(hidden.device)
            hidden, index, weights = hidden[mask], index[mask], weights[mask]
        with torch.no_grad():
            for expert in range(self.reap_sum.numel()):
                slots = index == expert  # [T, k]
                routed = slots.any(dim=-1)
                count = int(routed.sum())
                if count == 0:
                    continue
                gate = (weights * slots).sum(dim=-1)[routed].double()
                output = expert_output(self.experts, expert, hidden[routed])
                self.reap_sum[expert] += (gate * output.double().norm(dim=-1)).sum().cpu()
                self.tokens[expert] += count
                self.assignments[expert] += int(slots.sum())

    def saliency(self, kind: str) -> torch.Tensor:
        if kind == "frequency":
            return self.assignments.double()
        return self.reap_sum / self.tokens.clamp(min=1).double()  # an expert never routed to: 0


def expert_output(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_j(x) = W_down (act(W_gate x) * (W_up x)) of one expert of a fused experts module."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


def measure_saliency(model_dir: Path, options: ExpertPruningOptions) -> tuple[dict[int, dict[str, list]], Any]:
    """Per MoE layer {"saliency": [E], "frequency": [E], "reap": [E]} from the dense model (float32) on the
    calibration windows, and the calibration info."""
    from offline.calibration_data import load_calibration
    from offline.calibration_stream import embed_calibration
    from offline.layerwise import LayerwiseModel

    torch.manual_seed(options.seed)
    model = LayerwiseModel(model_dir, compute_dtype=torch.float32)
    calib = load_calibration(options.calib, model_dir, options.num_samples, options.seq_len, options.seed)
    stream = embed_calibration(model, calib, batch_size=8)
    result: dict[int, dict[str, list]] = {}
    for index in range(model.num_layers):
        layer = model.build_layer(index)
        hook = SaliencyHook(model.moe_block(layer).experts, model.dims.num_experts) \
            if index in model.moe_layers else None
        outputs = []
        for h, inputs, mask in zip(stream.hidden, stream.inputs, stream.masks):
            if hook is not None:
                hook.token_mask = mask
            outputs.append(model.run_layer(layer, index, h, inputs))
        stream.hidden = outputs
        if hook is not None:
            hook.remove()
            result[index] = {"saliency": hook.saliency(options.saliency).tolist(),
                             "frequency": hook.assignments.tolist(), "reap": hook.saliency("reap").tolist()}
            logger.info("layer %d: %s saliency %s", index, options.saliency,
                        [round(s, 4) for s in result[index]["saliency"]])
        del layer
    return result, calib.info


def kept_experts(saliency: list[float], p: int) -> list[int]:
    """The E - p experts of highest saliency, in their original order (ties: the lower id is kept)."""
    order = sorted(range(len(saliency)), key=lambda e: (saliency[e], -e))  # lowest first
    return sorted(order[p:])


# ------------------------------------------------------------------------------------------ output
def _moe_prefix(layout: MoELayout, layer: int) -> str:
    return f"model.layers.{layer}.{layout.moe_module}"


def pruned_tensor(name: str, tensor: torch.Tensor, layout: MoELayout, kept: dict[int, list[int]]
                  ) -> tuple[str, torch.Tensor] | None:
    """The output (name, tensor) of one input tensor, None for a pruned expert's tensor."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    layer = int(match.group(1)) if match else None
    if layer not in kept:
        return name, tensor
    prefix, ids = _moe_prefix(layout, layer), kept[layer]
    selected = torch.tensor(ids, dtype=torch.int64)
    router = {f"{prefix}.{layout.router}.weight"}
    if layout.router_bias:
        router.add(f"{prefix}.{layout.router}.{layout.router_bias}")
    if name in router or name in (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"):
        return name, tensor.index_select(0, selected).contiguous()
    expert = re.match(re.escape(f"{prefix}.experts.") + r"(\d+)\.(.+)$", name)
    if expert is None:
        return name, tensor
    old = int(expert.group(1))
    if old not in ids:
        return None
    return f"{prefix}.experts.{ids.index(old)}.{expert.group(2)}", tensor


def pruned_config(config: dict, layout: MoELayout, remaining: int) -> dict:
    out = dict(config)
    keys = [k for k in layout.num_experts_keys if k in out]
    if not keys:
        raise ExpertPruningError(f"config.json has none of {list(layout.num_experts_keys)} (number of experts)")
    for key in keys:
        out[key] = remaining
    return out


def write_pruned(model_dir: Path, out_dir: Path, config: dict, kept: dict[int, list[int]], report: dict,
                 force: bool) -> None:
    """The pruned checkpoint at `out_dir`, atomically (a half-written one is a hidden .partial directory)."""
    from offline.expert_tensors import CheckpointTensors

    layout = architecture(config["model_type"]).layout
    tensors = CheckpointTensors(model_dir)
    with atomic_directory(out_dir, replace=force) as partial:
        writer = ShardedSafetensorsWriter(partial)
        for name in tensors.names():
            result = pruned_tensor(name, tensors.get(name), layout, kept)
            if result is not None:
                writer.add(*result)
        writer.finish()
        write_config(partial, pruned_config(config, layout, report["experts_per_layer"]))
        copy_side_files(model_dir, partial)
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _routing_note(config: dict) -> str:
    if architecture(config["model_type"]).routing.renormalizes(config):
        return ("top-k weights renormalised: the pruned model computes the dense model with the pruned "
                "experts' router logits masked to -inf")
    return ("top-k weights not renormalised: the softmax runs over the kept experts only, so kept experts' "
            "weights are larger than in the dense model with the pruned logits masked")


# ------------------------------------------------------------------------------------------ entry point
def check_model(config: dict) -> None:
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExpertPruningError(f"expert pruning supports model types {list(SUPPORTED_MODEL_TYPES)}, not "
                                 f"{model_type!r}; compress it with `moesvd compress` instead")


def prune_experts(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: ExpertPruningOptions) -> dict:
    """Write `model_dir` with the p least salient experts of every MoE layer removed to `out_dir` (see the
    module docstring); returns the report also written as expert_pruning.json."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not isinstance(options, ExpertPruningOptions):
        raise ExpertPruningError(f"options must be ExpertPruningOptions, got {type(options).__name__}")
    check_output_dir(out_dir, options.force)
    config = read_config(model_dir)
    check_model(config)
    dims = moe_dims(config)
    p = experts_to_prune(options.ratio, dims.num_experts, dims.top_k)
    saliency, calib_info = measure_saliency(model_dir, options)
    missing = sorted(set(moe_layer_indices(config)) - set(saliency))
    if missing:
        raise AssertionError(f"MoE layers {missing} were not measured")
    kept = {layer: kept_experts(values["saliency"], p) for layer, values in saliency.items()}
    report = {
        "method": METHOD, "saliency": options.saliency, "options": dataclasses.asdict(options),
        "num_experts": dims.num_experts, "pruned_per_layer": p, "experts_per_layer": dims.num_experts - p,
        "requested_ratio": options.ratio, "achieved_ratio": p / dims.num_experts,
        "routing": _routing_note(config), "calibration": dataclasses.asdict(calib_info),
        "layers": {str(layer): {"kept": kept[layer], "pruned": sorted(set(range(dims.num_experts)) - set(kept[layer])),
                                **saliency[layer]} for layer in sorted(kept)},
    }
    write_pruned(model_dir, out_dir, config, kept, report, options.force)
    logger.info("wrote %s: %d of %d experts per MoE layer kept (%s saliency), removed %.1f%% of routed-expert "
                "parameters", out_dir, dims.num_experts - p, dims.num_experts, options.saliency,
                100 * p / dims.num_experts)
    return report
