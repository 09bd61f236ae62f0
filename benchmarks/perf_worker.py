"""Measurements that run inside a vLLM worker process (through `LLM.collective_rpc`).

Each public function takes the worker as its first argument (vLLM's `collective_rpc` calls a callable
with the worker object), so it sees the model exactly as vLLM loaded and post-processed it: prepacked
fused-MoE weights, the CPU linear dispatch, the real thread configuration of the worker. The driver
(benchmarks/run_perf.py) needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1` to send them.

The MoE block is called outside the model's forward (eager, with a forward context of `num_tokens`
tokens): vLLM's fused-MoE custom op finds its layer through the forward context. The block then runs
what the served model runs for that layer: router, shared-basis projections, fused MoE kernel.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

# Names of the MoE block attribute on a decoder layer (Qwen style / Mixtral style).
_MOE_ATTRIBUTES = ("mlp", "block_sparse_moe")
# Parameters of a MoE block that are routed-expert weights (shared bases count as expert weights, like
# the checkpoint's ParamCounts); the router (`gate`) and shared experts are not.
_BASIS_NAMES = ("moe_svd_in", "moe_svd_out")


@dataclass
class LayerWeights:
    """Resident routed-expert weights of one MoE layer, as loaded by vLLM."""

    layer: int
    expert_params: int  # elements of the fused expert tensors + shared bases
    expert_bytes: int
    basis_params: int
    basis_bytes: int
    dtypes: list[str]


def _model(worker) -> nn.Module:
    return worker.model_runner.get_model()


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, MoE block) for every decoder layer whose MLP has routed experts."""
    layers = model.model.layers
    blocks = []
    for index, layer in enumerate(layers):
        for name in _MOE_ATTRIBUTES:
            block = getattr(layer, name, None)
            if block is not None and hasattr(block, "experts"):
                blocks.append((index, block))
                break
    return blocks


def _is_expert_parameter(name: str) -> bool:
    return name.startswith("experts.") or name.split(".")[0] in _BASIS_NAMES


def _packed_linear_bytes(module: nn.Module) -> tuple[int, int] | None:
    """(elements, bytes) of a linear weight that vLLM's CPU dispatch moved out of the module.

    On CPU, vLLM replaces `weight` by an empty tensor and keeps a prepacked copy in the closure of
    `module.cpu_linear` (sgl-kernel packed tensor) or in an opaque oneDNN handle. The logical size is
    input_size x output_size; the bytes are the packed tensor's when it is reachable, else the
    logical size in the parameter dtype (oneDNN's handle does not expose its buffer).
    """
    linear = getattr(module, "cpu_linear", None)
    weight = getattr(module, "weight", None)
    if linear is None or weight is None or weight.numel() > 0:
        return None
    elements = int(module.input_size) * int(module.output_size)
    for cell in getattr(linear, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, torch.Tensor) and value.numel() >= elements:
            return elements, value.numel() * value.element_size()
    return elements, elements * weight.element_size()


def _basis_modules(block: nn.Module) -> list[nn.Module]:
    """The shared-basis linear layers of a MoE block (the plugin keeps them on vLLM's routed experts)."""
    found: dict[int, nn.Module] = {}
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in _BASIS_NAMES:
            found.setdefault(id(module), module)
    return list(found.values())


def layer_weights(block: nn.Module, layer: int) -> LayerWeights:
    """Count parameters once even when the runner and the block hold the same module."""
    seen: set[int] = set()
    params = nbytes = basis_params = basis_bytes = 0
    dtypes: set[str] = set()
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        if id(tensor) in seen or not _is_expert_parameter(name) or tensor.is_meta:
            continue
        if "bank_of_expert" in name or "group_of_expert" in name:
            continue  # routing tables, not weights
        seen.add(id(tensor))
        if tensor.numel() == 0:
            continue  # packed elsewhere (bases): counted below
        size = tensor.numel() * tensor.element_size()
        params += tensor.numel()
        nbytes += size
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
        if any(part in _BASIS_NAMES for part in name.split(".")):
            basis_params += tensor.numel()
            basis_bytes += size
    for module in _basis_modules(block):
        packed = _packed_linear_bytes(module)
        if packed is not None:
            params += packed[0]
            nbytes += packed[1]
            basis_params += packed[0]
            basis_bytes += packed[1]
            dtypes.add(str(module.weight.dtype).replace("torch.", ""))
    return LayerWeights(layer, params, nbytes, basis_params, basis_bytes, sorted(dtypes))


def resident_weights(worker) -> dict:
    """Per-layer resident expert weights, their totals, and the worker's resident set size."""
    per_layer = [layer_weights(block, index) for index, block in moe_blocks(_model(worker))]
    return {
        "layers": [asdict(w) for w in per_layer],
        "expert_params": sum(w.expert_params for w in per_layer),
        "expert_bytes": sum(w.expert_bytes for w in per_layer),
        "worker_rss_bytes": _rss_bytes(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hidden_states(block: nn.Module, num_tokens: int, hidden_size: int, seed: int) -> torch.Tensor:
    dtype = next(p.dtype for n, p in block.named_parameters() if n.startswith("gate"))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)


def _hidden_size(worker) -> int:
    return worker.vllm_config.model_config.get_hidden_size()


def _timed_calls(worker, block: nn.Module, states: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    from vllm.forward_context import set_forward_context

    seconds = []
    with torch.inference_mode(), set_forward_context(None, worker.vllm_config,
                                                     num_tokens=states.shape[0]):
        for step in range(warmup + repeats):
            started = time.perf_counter()
            block(states)
            if step >= warmup:
                seconds.append(time.perf_counter() - started)
    return seconds


def time_moe_block(worker, token_counts: list[int], repeats: int = 5, warmup: int = 2,
                   layer: int | None = None, seed: int = 0) -> dict[int, list[float]]:
    """Seconds per call of one MoE block (the first one, or decoder layer `layer`) at each token count."""
    blocks = dict(moe_blocks(_model(worker)))
    index = min(blocks) if layer is None else layer
    block = blocks[index]
    hidden = _hidden_size(worker)
    return {tokens: _timed_calls(worker, block, _hidden_states(block, tokens, hidden, seed + tokens),
                                 repeats, warmup)
            for tokens in token_counts}


# Profiler operator names -> part of the block, for the time split in docs/performance.md.
_CATEGORIES = (
    ("fused_moe_kernel", ("cpu_fused_moe", "fused_experts", "zentorch_fused_moe")),
    ("routing", ("topk", "softmax", "sort", "router", "index", "gate")),
    ("casts_copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone")),
    ("gemm", ("linear", "addmm", "aten::mm", "matmul", "onednn", "mkldnn", "gemm", "bmm")),
)


def _category(name: str) -> str:
    lowered = name.lower()
    for category, keys in _CATEGORIES:
        if any(key in lowered for key in keys):
            return category
    return "other"


def profile_moe_block(worker, num_tokens: int, repeats: int = 5, layer: int | None = None,
                      seed: int = 0) -> dict:
    """torch.profiler split of one MoE block call: self CPU time per operator and per category."""
    from torch.profiler import ProfilerActivity, profile
    from vllm.forward_context import set_forward_context

    blocks = dict(moe_blocks(_model(worker)))
    block = blocks[min(blocks) if layer is None else layer]
    states = _hidden_states(block, num_tokens, _hidden_size(worker), seed + num_tokens)
    _timed_calls(worker, block, states, repeats=1, warmup=2)
    with torch.inference_mode(), set_forward_context(None, worker.vllm_config, num_tokens=num_tokens):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                block(states)
    operators = []
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        operators.append({"name": event.key, "calls": event.count // repeats,
                          "self_ms": event.self_cpu_time_total / 1e3 / repeats})
    operators.sort(key=lambda op: -op["self_ms"])
    categories: dict[str, float] = {}
    for op in operators:
        category = _category(op["name"])
        categories[category] = categories.get(category, 0.0) + op["self_ms"]
    return {"num_tokens": num_tokens, "total_ms": sum(op["self_ms"] for op in operators),
            "categories_ms": categories, "operators": operators[:25]}


def _linear_kind(module: nn.Module) -> str:
    """Which CPU GEMM vLLM dispatched a linear layer to (sgl-kernel, oneDNN or torch)."""
    linear = getattr(module, "cpu_linear", None)
    if linear is None:
        return "unknown"
    code = getattr(linear, "__code__", None)
    names = set(code.co_names) if code is not None else set()
    if "weight_packed_linear_cpu" in names:
        return "sgl_weight_packed_linear"
    if "onednn_mm" in names:
        return "onednn_mm"
    if linear is torch.nn.functional.linear or "linear" in names:
        return "torch_linear"
    return getattr(linear, "__name__", "unknown")


def block_description(worker) -> dict:
    """Which classes and kernels the worker runs for the first MoE block (for the report)."""
    blocks = moe_blocks(_model(worker))
    if not blocks:
        return {}
    index, block = blocks[0]
    experts = block.experts
    routed = getattr(experts, "routed_experts", experts)
    method = getattr(routed, "quant_method", None)
    kernel = getattr(method, "moe_kernel", None)
    fused = getattr(kernel, "fused_experts", None)
    description = {
        "layer": index,
        "block_class": type(block).__name__,
        "quant_method": type(method).__name__ if method is not None else None,
        "experts_class": type(fused).__name__ if fused is not None else None,
        "isa": getattr(fused, "isa", None),
        "torch_threads": torch.get_num_threads(),
    }
    for name in _BASIS_NAMES:
        basis = getattr(block, name, None) or getattr(routed, name, None)
        if basis is not None:
            description[name] = {"shape": [int(basis.output_size), int(basis.input_size)],
                                 "dtype": str(basis.weight.dtype).replace("torch.", ""),
                                 "cpu_linear": _linear_kind(basis)}
    return description
