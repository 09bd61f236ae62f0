"""A compressed checkpoint with random shared-basis factors, for speed measurements only.

The serving cost of a decomposed layer depends on its shapes (rank r, banks, dtypes), never on the
values, so a benchmark can skip calibration and decomposition: this writer takes a dense checkpoint,
keeps every non-expert tensor (attention, norms, router, embeddings), and replaces each MoE layer's
experts by random tensors with the schema's names and shapes at a uniform rank r and kept intermediate
size I' (moesvd_vllm/format/schema.py): bases A [r, H] and B [H, r] with orthonormal rows/columns, factors
~ N(0, std). With `bases=False` (format v2, only at r = H) the layer has no bases: a neuron-selection
layer, i.e. a plain fused MoE with intermediate size I'. The `moe_svd` block is
a real one (method "synthetic-random"), written by the one compressed-checkpoint writer
(moesvd_vllm/format/writer.py), so the plugin loads and validates it like any compressor output. Its
outputs are meaningless text.

Memory: one tensor at a time (the writer spills every tensor to disk at once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from moesvd_vllm.architectures import moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.format.safetensors_io import open_safetensors, tensor_files, torch_dtype
from moesvd_vllm.format.directories import read_config
from moesvd_vllm.format.schema import LayerSpec, expected_layer_tensors
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter

logger = logging.getLogger(__name__)

METHOD = "synthetic-random"


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
        tensors[name] = value.to(torch_dtype(dtype)).contiguous()
    return tensors


def _copy(writer: CompressedCheckpointWriter, names: list[str], source: dict[str, Path]) -> None:
    for name in names:
        with open_safetensors(source[name], framework="pt") as handle:
            writer.add(name, handle.get_tensor(name), stage=COPIED)


def synthetic_layer_spec(dims, rank: int, *, intermediate: int | None = None, bases: bool = True,
                         basis_dtype: str = "bfloat16", basis_groups: int = 1) -> LayerSpec:
    """The uniform LayerSpec of every synthetic layer (one bank per expert); validated against `dims`."""
    spec = LayerSpec(form="shared_basis", rank=rank, num_experts=dims.num_experts,
                     bank_map=list(range(dims.num_experts)), basis_dtype=basis_dtype,
                     intermediate=None if intermediate == dims.intermediate else intermediate, bases=bases,
                     basis_groups=basis_groups)
    spec.validate("synthetic layer")
    spec.validate_dims(dims, "synthetic layer")
    return spec


def write_synthetic_compressed(dense_dir: Path, out_dir: Path, rank: int, *, intermediate: int | None = None,
                               bases: bool = True, basis_dtype: str = "bfloat16", seed: int = 0,
                               std: float = 0.02, basis_groups: int = 1) -> Path:
    """Write `out_dir`: `dense_dir` with every MoE layer replaced by random factors of rank `rank` and
    `intermediate` kept neurons per expert (None: all); `bases=False` needs rank == hidden size."""
    started = time.monotonic()
    config = read_config(dense_dir)
    model_type = config["model_type"]
    dims = moe_dims(config)
    layout = moe_layout(model_type)
    model_dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    spec = synthetic_layer_spec(dims, rank, intermediate=intermediate, bases=bases, basis_dtype=basis_dtype,
                                basis_groups=basis_groups)
    layers = moe_layer_indices(config)
    source = tensor_files(dense_dir)
    generator = torch.Generator().manual_seed(seed)
    remaining = set(source)
    with CompressedCheckpointWriter(config, out_dir, replace=True) as writer:
        for layer in layers:
            prefix = f"model.layers.{layer}.{layout.moe_module}"
            kept = sorted(n for n in remaining if n.startswith(f"model.layers.{layer}.")
                          and not _is_routed_expert_tensor(n, prefix))
            dropped = {n for n in remaining if _is_routed_expert_tensor(n, prefix)}
            _copy(writer, kept, source)
            for name, tensor in _layer_tensors(model_type, layer, spec, dims, model_dtype, std, generator).items():
                writer.add(name, tensor, stage="the synthetic random factors")
            remaining -= set(kept) | dropped
        _copy(writer, sorted(remaining), source)
        block = writer.finish(
            method=METHOD, layers={str(layer): spec for layer in layers}, side_files_from=dense_dir,
            options={"rank": rank, "intermediate": spec.kept_intermediate(dims), "bases": bases, "seed": seed,
                     "std": std, "note": "random factors: speed only"})
    logger.info("wrote synthetic compressed checkpoint %s (rank %d, intermediate %d, bases %s, ratio %.3f) "
                "in %.0f s", out_dir, rank, spec.kept_intermediate(dims), bases, block.params.ratio,
                time.monotonic() - started)
    return out_dir
