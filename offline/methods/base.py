"""What a compression method is: the hooks the pipeline calls, its defaults, and the registry.

A method is a subclass of `CompressionMethod` that sets `name`; defining the class registers it, and
`offline.methods` imports every module of its package, so a new method is one new file there (plus its
tests): the options, the `--method` choices of `moesvd compress` and the pipeline find it by name.

The layer-sequential pipeline (`offline.pipeline`) calls, in order:
  1. `rank_steps(dims)` and `counting_spec(dims, shape)` while planning: the candidate ranks and the
     parameter count of a layer of a given shape (the plan picks shapes that meet the target ratio);
  2. `compress_layer(work)` for each planned layer, once its calibration statistics are collected: it
     decomposes the layer's routed experts, hands each stored tensor to `work.emit` as soon as it exists
     and, with `work.write_back`, rewrites the in-memory experts to compute what the checkpoint computes
     (so the next layer is calibrated on the compressed model's outputs).

Class attributes give the method's checkpoint form and the defaults of the options left as None
(`CompressionOptions.selection`, `min_intermediate_fraction`, `trim_keep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moesvd_vllm.architectures import MoEDims, MoELayout, moe_layout
from moesvd_vllm.format.safetensors_io import dtype_name, torch_dtype
from moesvd_vllm.format.schema import LayerSpec
from offline.calibration import ExpertStatistics
from offline.distributed import Ranks
from offline.sensitivity import LayerShape

if TYPE_CHECKING:
    from torch import nn

    from offline.compression_options import CompressionOptions
    from offline.layerwise import LayerwiseModel


class TensorSink:
    """Hands each tensor of a compressed layer on as soon as it exists (to the writer, which spills it to
    disk) and remembers its shape and dtype for the schema check: the layer's factors are never all in
    memory."""

    def __init__(self, add: Callable[[str, torch.Tensor], None]):
        self._add = add
        self.written: dict[str, tuple[tuple[int, ...], str]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.written[name] = (tuple(tensor.shape), dtype_name(tensor.dtype))
        self._add(name, tensor)


@dataclass
class LayerWork:
    """One planned layer handed to `CompressionMethod.compress_layer`: the built decoder layer (its experts
    still dense), its calibration statistics, the planned shape and where the stored tensors go."""

    model: LayerwiseModel
    index: int
    layer: nn.Module
    stats: ExpertStatistics
    shape: LayerShape
    sensitivity: float | None  # S_L (Eq. 4), recorded in the layer's spec; None without a sensitivity pass
    write_back: bool  # rewrite the in-memory experts to what the checkpoint computes
    emit: TensorSink
    ranks: Ranks = field(default_factory=Ranks)  # the processes sharing the work (offline/distributed.py)

    @property
    def dims(self) -> MoEDims:
        return self.model.dims

    @property
    def layout(self) -> MoELayout:
        return moe_layout(self.model.model_type)

    @property
    def prefix(self) -> str:
        """On-disk name prefix of the layer's MoE block, e.g. `model.layers.3.mlp`."""
        return f"model.layers.{self.index}.{self.layout.moe_module}"

    @cached_property
    def model_dtype(self) -> torch.dtype:
        """The stored dtype of the expert weights, which the factors keep."""
        return torch_dtype(self.model.expert_dtype())


@dataclass
class CompressedLayer:
    spec: LayerSpec
    written: dict[str, tuple[tuple[int, ...], str]]  # on-disk name -> (shape, stored dtype), as emitted
    relative_error: dict[str, float]  # projection -> sum_e ||(W_e - W'_e) X_e^T||^2 / sum_e ||W_e X_e^T||^2


_REGISTRY: dict[str, type[CompressionMethod]] = {}


class CompressionMethod:
    """Base of every method (see the module docstring). Subclasses without a `name` are not registered
    (shared machinery of a family of methods)."""

    name: ClassVar[str | None] = None  # `moe_svd.method` and `--method`
    summary: ClassVar[str] = ""  # one line for `moesvd compress --help`
    form: ClassVar[str]  # the checkpoint form: "shared_basis" (servable) or "per_expert"
    servable: ClassVar[bool]  # does the vLLM plugin serve the output (else: offline evaluation only)?
    selection: ClassVar[str]  # default layer selection: "sensitivity" (Eq. 4) or "all"
    min_intermediate_fraction: ClassVar[float] = 1.0  # default; 1.0 = rank only (no neuron selection)
    trim_keep: ClassVar[int | None] = None  # default experts kept per group by U-trimming; None: none
    supports_neuron_selection: ClassVar[bool] = False  # may min_intermediate_fraction be below 1?

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in _REGISTRY:
            raise TypeError(f"compression method {name!r} is defined twice: {_REGISTRY[name]} and {cls}")
        _REGISTRY[name] = cls

    def __init__(self, options: CompressionOptions):
        self.options = options

    # ----------------------------------------------------------------------------------- planning hooks
    def rank_steps(self, dims: MoEDims) -> tuple[int, int]:
        """(largest rank, rank step) of the candidate layer shapes."""
        raise NotImplementedError

    def planned_banks(self, dims: MoEDims) -> int:
        """Expert banks a compressed layer stores (fewer than the experts under U-trimming)."""
        return dims.num_experts

    def counting_spec(self, dims: MoEDims, shape: LayerShape) -> LayerSpec:
        """A spec with the parameter count of a layer of `shape` (a placeholder bank map with the planned
        number of banks; the basis dtype does not change the count)."""
        banks = self.planned_banks(dims)
        bank_map = [min(e, banks - 1) for e in range(dims.num_experts)]
        intermediate = None if shape.intermediate == dims.intermediate else shape.intermediate
        return LayerSpec(form=self.form, rank=shape.rank, num_experts=dims.num_experts, bank_map=bank_map,
                         intermediate=intermediate, bases=shape.bases)

    # ----------------------------------------------------------------------------------- the layer hook
    def compress_layer(self, work: LayerWork) -> CompressedLayer:
        raise NotImplementedError


def registered_methods() -> dict[str, type[CompressionMethod]]:
    """Method name -> class, in the order the classes were defined."""
    return dict(_REGISTRY)
