"""Exact ("full-rank") conversions of a dense MoE checkpoint into the compressed-checkpoint format.

These checkpoints are test instruments: serving or evaluating them must reproduce a known dense model to
float rounding, so any difference exposes a wiring error in the reader (the plugin or `offline.reference`).

`write_full_rank_checkpoint(dense_dir, out_dir)` writes, for every decomposed MoE layer, with H the hidden
size and r = H rounded up to a multiple of 32 (the extra rank is zero-padding, still exact):

* form "shared_basis": A = P [r, H], B = P^T [H, r], where P has orthonormal columns (P^T P = I_H):
  the identity (`basis="identity"`) or the first H columns of a seeded random orthogonal matrix
  (`basis="orthogonal"`: non-symmetric, so using A^T for A or B^T for B gives a different model).
  Bank k's factors are gate_k = W_gate[e_k] P^T, up_k = W_up[e_k] P^T, down_k = P W_down[e_k], with e_k the
  first expert mapped to bank k, so expert e computes B down_k(act(gate_k(A x)) * up_k(A x)) =
  W_down[e_k](act(W_gate[e_k] x) * W_up[e_k] x) exactly.
* form "per_expert": r = max(H, I); lora_a = P [r, in], lora_b = W P^T [out, r] for every projection.

With a `bank_map` (several experts sharing one bank, as U-trimming does), the shared_basis checkpoint is
exactly equivalent to the dense checkpoint written by `write_expanded_dense_checkpoint` with the same map:
the original architecture where every expert e holds the weights of expert e_{bank_map[e]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moesvd_vllm.architectures import MoEDims, moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.format.safetensors_io import DEFAULT_MAX_SHARD_BYTES, torch_dtype
from moesvd_vllm.format.directories import read_config, write_checkpoint
from moesvd_vllm.format.schema import CONFIG_KEY, RANK_MULTIPLE, LayerSpec, SchemaError
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline.expert_tensors import (
    CheckpointTensors,
    LayerExperts,
    moe_prefix,
    per_expert_names,
    read_layer_experts,
)

logger = logging.getLogger(__name__)

METHOD = "full-rank"
BASES = ("identity", "orthogonal")
FORMS = ("shared_basis", "per_expert")

BankMapArg = Sequence[int] | Mapping[int, Sequence[int]] | None


@dataclass(frozen=True)
class FullRankOptions:
    """How to convert; `from_dict` rejects unknown keys."""

    form: str = "shared_basis"  # "shared_basis" or "per_expert"
    basis: str = "identity"  # "identity" or "orthogonal" (seeded random orthogonal P)
    basis_dtype: str = "float32"  # dtype of the shared bases A and B
    layers: tuple[int, ...] | None = None  # MoE layers to convert (None: all); others stay dense
    bank_maps: dict[int, tuple[int, ...]] | None = None  # layer -> expert-to-bank map (None: identity)
    seed: int = 0
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FullRankOptions":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise TypeError(f"unknown full-rank option(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)

    def validate(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r}: use one of {FORMS}")
        if self.basis not in BASES:
            raise ValueError(f"basis={self.basis!r}: use one of {BASES}")
        torch_dtype(self.basis_dtype)
        if self.form == "per_expert" and self.bank_maps:
            raise ValueError("bank maps need form='shared_basis' (the per_expert form has no banks)")


def normalize_bank_maps(bank_map: BankMapArg, layers: Sequence[int]) -> dict[int, tuple[int, ...]] | None:
    """One map for every layer (a list) or one per layer (a dict layer -> list) -> dict for `layers`."""
    if bank_map is None:
        return None
    if isinstance(bank_map, Mapping):
        unknown = sorted(set(int(k) for k in bank_map) - set(layers))
        if unknown:
            raise ValueError(f"bank_map names layers {unknown} that are not converted (converted: {list(layers)})")
        return {int(k): tuple(int(b) for b in v) for k, v in bank_map.items()}
    shared = tuple(int(b) for b in bank_map)
    return {layer: shared for layer in layers}


def bank_representatives(bank_map: Sequence[int]) -> list[int]:
    """Bank k takes the weights of the first expert mapped to it."""
    representatives: dict[int, int] = {}
    for expert, bank in enumerate(bank_map):
        representatives.setdefault(bank, expert)
    return [representatives[k] for k in range(len(representatives))]


def padded_rank(size: int, multiple: int = RANK_MULTIPLE) -> int:
    return int(math.ceil(size / multiple) * multiple)


def orthonormal_columns(rows: int, cols: int, basis: str, generator: torch.Generator) -> torch.Tensor:
    """P [rows, cols] in float64 with P^T P = I: the identity, or columns of a random orthogonal matrix."""
    if rows < cols:
        raise ValueError(f"cannot embed {cols} dimensions in {rows}")
    if basis == "identity":
        return torch.eye(rows, cols, dtype=torch.float64)
    gaussian = torch.randn(rows, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique (Haar) orthogonal matrix
    return q[:, :cols].contiguous()


def shared_basis_tensors(experts: LayerExperts, model_type: str, layer_index: int, spec: LayerSpec,
                         projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """On-disk tensors of an exact shared_basis layer (see module docstring)."""
    layout = moe_layout(model_type)
    prefix = moe_prefix(model_type, layer_index)
    basis_dtype = torch_dtype(spec.basis_dtype)
    factor_dtype = experts.gate.dtype
    p = projection  # [r, H]
    out = {
        f"{prefix}.moe_svd_in.weight": p.to(basis_dtype),
        f"{prefix}.moe_svd_out.weight": p.T.contiguous().to(basis_dtype),
    }
    for bank, expert in enumerate(bank_representatives(spec.bank_map)):
        gate = experts.gate[expert].double() @ p.T
        up = experts.up[expert].double() @ p.T
        down = p @ experts.down[expert].double()
        base = f"{prefix}.experts.{bank}"
        out[f"{base}.{layout.gate_proj}.weight"] = gate.to(factor_dtype)
        out[f"{base}.{layout.up_proj}.weight"] = up.to(factor_dtype)
        out[f"{base}.{layout.down_proj}.weight"] = down.to(factor_dtype)
    return out


def per_expert_tensors(experts: LayerExperts, model_type: str, layer_index: int, rank: int,
                       basis: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """On-disk tensors of an exact per_expert layer: W = lora_b @ lora_a with lora_a = P^T-embedding."""
    hidden, intermediate = experts.gate.shape[2], experts.gate.shape[1]
    full = orthonormal_columns(rank, max(hidden, intermediate), basis, generator)
    p_hidden, p_intermediate = full[:, :hidden], full[:, :intermediate]
    out = {}
    for expert in range(experts.gate.shape[0]):
        names = per_expert_names(model_type, layer_index, expert)
        weights = (experts.gate[expert], experts.up[expert], experts.down[expert])
        inputs = (p_hidden, p_hidden, p_intermediate)
        for name, weight, p in zip(names, weights, inputs):
            stem = name.removesuffix(".weight")
            out[f"{stem}.lora_a"] = p.to(weight.dtype)
            out[f"{stem}.lora_b"] = (weight.double() @ p.T).to(weight.dtype)
    return out


def _layer_spec(options: FullRankOptions, dims: MoEDims, layer_index: int) -> LayerSpec:
    if options.form == "per_expert":
        rank = max(dims.hidden, dims.intermediate)
        bank_map = list(range(dims.num_experts))
    else:
        rank = padded_rank(dims.hidden)
        maps = options.bank_maps or {}
        bank_map = list(maps.get(layer_index, range(dims.num_experts)))
    spec = LayerSpec(form=options.form, rank=rank, num_experts=dims.num_experts, bank_map=bank_map,
                     basis_dtype=options.basis_dtype)
    try:
        spec.validate(f"layer {layer_index}")
    except SchemaError as error:
        raise ValueError(f"invalid bank map for layer {layer_index}: {error}") from None
    return spec


def _selected_layers(config: dict, layers: Sequence[int] | None) -> list[int]:
    moe_layers = moe_layer_indices(config)
    if layers is None:
        return moe_layers
    not_moe = sorted(set(layers) - set(moe_layers))
    if not_moe:
        raise ValueError(f"layers {not_moe} are not MoE layers of this model (MoE layers: {moe_layers})")
    return sorted(set(int(layer) for layer in layers))


def write_full_rank_checkpoint(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                               form: str = "shared_basis", basis: str = "identity",
                               bank_map: BankMapArg = None, basis_dtype: str = "float32",
                               layers: Sequence[int] | None = None, seed: int = 0,
                               overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write an exactly equivalent compressed checkpoint of `dense_dir` to `out_dir` (see module doc).

    `bank_map`: one expert->bank list for every converted layer, or a dict layer -> list; the result then
    equals `write_expanded_dense_checkpoint(dense_dir, ..., bank_map=bank_map)`, not `dense_dir` itself.
    `layers`: MoE layer indices to convert (default: all); other layers keep their dense experts.
    """
    config = read_config(dense_dir)
    if CONFIG_KEY in config:
        raise ValueError(f"{dense_dir} is already a compressed checkpoint (config.json has `{CONFIG_KEY}`)")
    model_type = config.get("model_type", "")
    dims = moe_dims(config)
    selected = _selected_layers(config, layers)
    options = FullRankOptions(form=form, basis=basis, basis_dtype=basis_dtype, layers=tuple(selected),
                              bank_maps=normalize_bank_maps(bank_map, selected), seed=seed,
                              max_shard_bytes=max_shard_bytes)
    options.validate()
    tensors = CheckpointTensors(dense_dir)
    generator = torch.Generator().manual_seed(seed)
    specs: dict[str, LayerSpec] = {}
    consumed: set[str] = set()
    out_dir = Path(out_dir)
    with CompressedCheckpointWriter(config, out_dir, replace=overwrite, max_shard_bytes=max_shard_bytes) as writer:
        for layer_index in tqdm(selected, desc="full-rank layers", disable=len(selected) < 8):
            experts = read_layer_experts(tensors, model_type, layer_index, dims)
            consumed.update(experts.source_names)
            spec = _layer_spec(options, dims, layer_index)
            if form == "shared_basis":
                projection = orthonormal_columns(spec.rank, dims.hidden, basis, generator)
                written = shared_basis_tensors(experts, model_type, layer_index, spec, projection)
            else:
                written = per_expert_tensors(experts, model_type, layer_index, spec.rank, basis, generator)
            for name, tensor in written.items():
                writer.add(name, tensor, stage=f"the full-rank {form} conversion")
            specs[str(layer_index)] = spec
        for name in tensors.names():
            if name not in consumed:
                writer.add(name, tensors.get(name), stage=COPIED)
        writer.finish(method=METHOD, layers=specs, side_files_from=dense_dir,
                      options={"form": options.form, "basis": options.basis, "seed": options.seed,
                               "basis_dtype": options.basis_dtype})
    logger.info("wrote %s checkpoint (%s basis, %d layers) to %s", form, basis, len(specs), out_dir)
    return out_dir


def _expanded_tensors(tensors: CheckpointTensors, model_type: str, dims: MoEDims, selected: Sequence[int],
                      maps: Mapping[int, Sequence[int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The bank-expanded experts of the `selected` layers (per-expert Hub names), then every other tensor."""
    consumed: set[str] = set()
    for layer_index in selected:
        experts = read_layer_experts(tensors, model_type, layer_index, dims)
        consumed.update(experts.source_names)
        layer_map = list(maps.get(layer_index, range(dims.num_experts)))
        LayerSpec("shared_basis", RANK_MULTIPLE, dims.num_experts, layer_map).validate(
            f"bank_map of layer {layer_index}")
        representatives = bank_representatives(layer_map)
        for expert in range(dims.num_experts):
            source = representatives[layer_map[expert]]
            gate, up, down = per_expert_names(model_type, layer_index, expert)
            yield gate, experts.gate[source].clone()
            yield up, experts.up[source].clone()
            yield down, experts.down[source].clone()
    yield from ((name, tensors.get(name)) for name in tensors.names() if name not in consumed)


def write_expanded_dense_checkpoint(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                                    bank_map: BankMapArg, layers: Sequence[int] | None = None,
                                    overwrite: bool = False,
                                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """The dense checkpoint in which every expert e holds the weights of its bank's representative.

    Same architecture and names as `dense_dir` (experts written with per-expert Hub names); equals the
    shared_basis checkpoint written by `write_full_rank_checkpoint` with the same `bank_map` and `layers`.
    """
    config = read_config(dense_dir)
    if CONFIG_KEY in config:
        raise ValueError(f"{dense_dir} is a compressed checkpoint; expand a dense one")
    model_type = config.get("model_type", "")
    dims = moe_dims(config)
    selected = _selected_layers(config, layers)
    maps = normalize_bank_maps(bank_map, selected) or {}
    tensors = CheckpointTensors(dense_dir)
    out_dir = Path(out_dir)
    write_checkpoint(out_dir, config, _expanded_tensors(tensors, model_type, dims, selected, maps),
                     side_files_from=dense_dir, replace=overwrite, max_shard_bytes=max_shard_bytes)
    logger.info("wrote bank-expanded dense checkpoint to %s", out_dir)
    return out_dir


def _parse_bank_map(text: str | None) -> list[int] | None:
    return None if text is None else [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m offline.full_rank",
        description="Write an exact full-rank compressed checkpoint (or its bank-expanded dense twin).")
    parser.add_argument("dense_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--form", choices=FORMS, default="shared_basis")
    parser.add_argument("--basis", choices=BASES, default="identity")
    parser.add_argument("--basis-dtype", default="float32")
    parser.add_argument("--bank-map", help="comma-separated expert->bank map applied to every layer")
    parser.add_argument("--expanded-dense", action="store_true",
                        help="write the dense checkpoint whose experts hold their bank's weights instead")
    parser.add_argument("--layers", help="comma-separated MoE layer indices (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    bank_map = _parse_bank_map(args.bank_map)
    if args.expanded_dense:
        if bank_map is None:
            parser.error("--expanded-dense needs --bank-map")
        out = write_expanded_dense_checkpoint(args.dense_dir, args.out_dir, bank_map=bank_map,
                                              layers=layers, overwrite=args.overwrite)
    else:
        out = write_full_rank_checkpoint(args.dense_dir, args.out_dir, form=args.form, basis=args.basis,
                                         bank_map=bank_map, basis_dtype=args.basis_dtype, layers=layers,
                                         seed=args.seed, overwrite=args.overwrite)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
