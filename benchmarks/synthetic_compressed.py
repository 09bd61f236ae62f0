"""A compressed checkpoint with random shared-basis factors, for speed measurements only.

The serving cost of a decomposed layer depends on its shapes (rank r, banks, dtypes), never on the
values, so a benchmark can skip calibration and decomposition: this writer takes a dense checkpoint,
keeps every non-expert tensor (attention, norms, router, embeddings), and replaces each MoE layer's
experts by random tensors with the schema's names and shapes at a uniform rank r and kept intermediate
size I' (moesvd_vllm/format/schema.py): bases A [r, H] and B [H, r] with orthonormal rows/columns, factors
~ N(0, std). With `bases=False` (format v2, only at r = H) the layer has no bases: a neuron-selection
layer, i.e. a plain fused MoE with intermediate size I'. The `moe_svd` block is
a real one (method "synthetic-random", ParamCounts from the schema's counting), so the plugin loads
and validates it like any compressor output. Its outputs are meaningless text.

Memory: one layer's new tensors at a time (about (1 - ratio) x one dense layer).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES, moe_dims, moe_layer_indices, moe_layout

from moesvd_vllm.format.schema import (

    CONFIG_KEY,

    FORMAT_VERSION,

    LayerSpec,

    MoESVDConfig,

    ParamCounts,

    decomposed_layer_params,

    dense_layer_params,

    expected_layer_tensors,

)
from offline.expert_tensors import copy_side_files, write_config

logger = logging.getLogger(__name__)

METHOD = "synthetic-random"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source_tensors(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file of the dense checkpoint."""
    names: dict[str, Path] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                names[name] = shard
    return names


def _is_routed_expert_tensor(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".experts.")


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    tall = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, _ = torch.linalg.qr(tall)
    return q if rows > cols else q.T


def _layer_tensors(model_type: str, layer: int, spec: LayerSpec, dims, model_dtype: str, std: float,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (shape, dtype) in expected_layer_tensors(model_type, layer, spec, dims, model_dtype).items():
        if name.endswith("moe_svd_in.weight") or name.endswith("moe_svd_out.weight"):
            value = _orthonormal(shape[0], shape[1], generator)
        else:
            value = torch.randn(*shape, generator=generator) * std
        tensors[name] = value.to(_TORCH_DTYPES[dtype]).contiguous()
    return tensors


def _copy_group(names: list[str], source: dict[str, Path]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        with safe_open(str(source[name]), framework="pt") as handle:
            out[name] = handle.get_tensor(name)
    return out


def synthetic_layer_spec(dims, rank: int, *, intermediate: int | None = None, bases: bool = True,
                         basis_dtype: str = "bfloat16") -> LayerSpec:
    """The uniform LayerSpec of every synthetic layer (one bank per expert); validated against `dims`."""
    spec = LayerSpec(form="shared_basis", rank=rank, num_experts=dims.num_experts,
                     bank_map=list(range(dims.num_experts)), basis_dtype=basis_dtype,
                     intermediate=None if intermediate == dims.intermediate else intermediate, bases=bases)
    spec.validate("synthetic layer")
    spec.validate_dims(dims, "synthetic layer")
    return spec


def write_synthetic_compressed(dense_dir: Path, out_dir: Path, rank: int, *, intermediate: int | None = None,
                               bases: bool = True, basis_dtype: str = "bfloat16", seed: int = 0,
                               std: float = 0.02) -> Path:
    """Write `out_dir`: `dense_dir` with every MoE layer replaced by random factors of rank `rank` and
    `intermediate` kept neurons per expert (None: all); `bases=False` needs rank == hidden size."""
    started = time.monotonic()
    config = json.loads((dense_dir / "config.json").read_text())
    model_type = config["model_type"]
    dims = moe_dims(config)
    layout = moe_layout(model_type)
    model_dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    spec = synthetic_layer_spec(dims, rank, intermediate=intermediate, bases=bases, basis_dtype=basis_dtype)
    layers = moe_layer_indices(config)
    source = _source_tensors(dense_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    remaining = set(source)
    for layer in layers:
        prefix = f"model.layers.{layer}.{layout.moe_module}"
        kept = sorted(n for n in remaining if n.startswith(f"model.layers.{layer}.")
                      and not _is_routed_expert_tensor(n, prefix))
        dropped = {n for n in remaining if _is_routed_expert_tensor(n, prefix)}
        tensors = _copy_group(kept, source)
        tensors.update(_layer_tensors(model_type, layer, spec, dims, model_dtype, std, generator))
        shard = f"layer-{layer:03d}.safetensors"
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        remaining -= set(kept) | dropped
        del tensors
    rest = _copy_group(sorted(remaining), source)
    save_file(rest, str(out_dir / "rest.safetensors"), metadata={"format": "pt"})
    weight_map.update({name: "rest.safetensors" for name in rest})
    total = sum((out_dir / f).stat().st_size for f in set(weight_map.values()))
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    dense_params = dense_layer_params(dims) * len(layers)
    block = MoESVDConfig(format_version=FORMAT_VERSION, method=METHOD,
                         original_architectures=list(config.get("architectures") or []),
                         layers={str(layer): spec for layer in layers},
                         params=ParamCounts(expert_dense=dense_params,
                                            expert_compressed=decomposed_layer_params(spec, dims) * len(layers)),
                         options={"rank": rank, "intermediate": spec.kept_intermediate(dims), "bases": bases,
                                  "seed": seed, "std": std, "note": "random factors: speed only"})
    MoESVDConfig.from_dict(json.loads(json.dumps(block.to_dict())))  # what the plugin will read
    config["architectures"] = [PLUGIN_ARCHITECTURES[a] for a in config.get("architectures") or []]
    config[CONFIG_KEY] = block.to_dict()
    write_config(out_dir, config)
    copy_side_files(dense_dir, out_dir)
    logger.info("wrote synthetic compressed checkpoint %s (rank %d, intermediate %d, bases %s, ratio %.3f) "
                "in %.0f s", out_dir, rank, spec.kept_intermediate(dims), bases, block.params.ratio,
                time.monotonic() - started)
    return out_dir
