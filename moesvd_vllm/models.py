"""The plugin model classes: vLLM's own model classes with the MoE-SVD quantization config installed.

For each plugin-only architecture of the architecture table (`architectures.PLUGIN_ARCHITECTURES`, e.g.
`MoESVDQwen3MoeForCausalLM`) the class is vLLM's class of the original architecture
(`Qwen3MoeForCausalLM`), unchanged but for two methods:

* `__init__` installs `MoESVDQuantizationConfig` (moesvd_vllm/quantization.py) as the model's
  quantization config before the stock constructor runs, so the stock model builds itself (attention,
  router, shared experts, dense layers) and only the routed experts of decomposed layers get the
  `SharedBasisExperts` method (moesvd_vllm/layers.py);
* `load_weights` streams the checkpoint through `CompressedCheckpointValidator` (every tensor of a
  decomposed layer has the schema's name and shape, none is missing or left over), refuses a NaN or Inf in
  any tensor of a decomposed MoE block naming it, loads the shared bases (`<block>.moe_svd_in.weight`,
  `<block>.moe_svd_out.weight`, which no stock loader knows) and hands everything else, the bank factors
  `<block>.experts.<k>.<projection>.weight` included, to the stock loader.

The plugin-only names keep a missing plugin loud: stock vLLM refuses them ("Model architectures [...] are
not supported") instead of loading a compressed checkpoint into full-size parameters. Classes are built on
first access (module `__getattr__`), so registering them imports neither torch nor vLLM's model code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES

logger = logging.getLogger("vllm.moesvd_vllm.models")

PLUGIN_CLASS_NAMES = tuple(dict.fromkeys(PLUGIN_ARCHITECTURES.values()))


def original_architecture(plugin_name: str) -> str:
    """The first original architecture of `plugin_name` that this vLLM has a model class for."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    candidates = [orig for orig, plugin in PLUGIN_ARCHITECTURES.items() if plugin == plugin_name]
    for orig in candidates:
        if orig in supported:
            return orig
    raise AttributeError(f"vLLM has no model class for {candidates} (the originals of {plugin_name})")


def install_compression(vllm_config) -> None:
    """Refuse what cannot be served exactly, then make the MoE-SVD config the model's quantization config."""
    from moesvd_vllm.architectures import moe_layer_indices
    from moesvd_vllm.layers import CompressionConfigError, compression_config, serving_betas
    from moesvd_vllm.quantization import MoESVDQuantizationConfig

    if isinstance(vllm_config.quant_config, MoESVDQuantizationConfig):
        return
    hf_config = vllm_config.model_config.hf_text_config
    compression = compression_config(hf_config)
    config = hf_config.to_dict()
    not_moe = sorted(set(compression.decomposed_layers) - set(moe_layer_indices(config)))
    if not_moe:
        raise CompressionConfigError(
            f"moe_svd.layers names decoder layer(s) {not_moe}, which are not MoE layers of this "
            f"{config.get('model_type')} model; the checkpoint's config.json and moe_svd block disagree")
    if vllm_config.quant_config is not None:
        raise CompressionConfigError(
            "quantization is not supported together with MoE-SVD compressed layers; start the server "
            "without --quantization")
    _refuse_cpu_expert_parallel_with_dense_layers(vllm_config, compression, config)
    if vllm_config.parallel_config.enable_ep_weight_filter:
        raise CompressionConfigError(
            "--enable-ep-weight-filter skips the expert tensors of other ranks, but every rank of a MoE-SVD "
            "layer holds every bank (the banks' neurons are split instead); start the server without it")
    if vllm_config.lora_config is not None:
        raise CompressionConfigError(
            "LoRA adapters are not supported on MoE-SVD compressed layers; start the server without "
            "--enable-lora")
    quant_config = MoESVDQuantizationConfig(compression, config)
    quant_config.skip_betas = serving_betas(hf_config, compression)
    if quant_config.skip_betas and vllm_config.parallel_config.enable_expert_parallel:
        raise CompressionConfigError(
            "expert skipping with --enable-expert-parallel is not supported (the kept pairs are handed to the "
            "kernel as a top-1 problem without an expert map); serve with --tensor-parallel-size, or turn "
            "skipping off with MOESVD_SKIP_BETA=off")
    vllm_config.quant_config = quant_config
    if quant_config.skip_betas:
        logger.info("moesvd: expert skipping, beta per MoE layer %s", quant_config.skip_betas)
    logger.info("moesvd: %s with %d MoE-SVD layer(s) (method %s, format %d) on vLLM's %s",
                hf_config.architectures, len(compression.layers), compression.method,
                compression.format_version, config.get("model_type"))


def _refuse_cpu_expert_parallel_with_dense_layers(vllm_config, compression, config: dict) -> None:
    """vLLM 0.32's CPU fused-MoE kernel has no expert map (`CPUUnquantizedExperts.supports_expert_map()` is
    False): with --enable-expert-parallel, a MoE layer left dense indexes its rank's half of the experts with
    global expert ids and the worker dies with a segmentation fault in cpu_fused_moe (measured). MoE-SVD
    layers keep every bank on every rank and are not affected; refuse the combination instead of crashing."""
    from vllm.platforms import current_platform

    from moesvd_vllm.architectures import moe_layer_indices
    from moesvd_vllm.layers import CompressionConfigError

    if not (vllm_config.parallel_config.enable_expert_parallel and current_platform.is_cpu()):
        return
    dense = sorted(set(moe_layer_indices(config)) - set(compression.decomposed_layers))
    if dense:
        raise CompressionConfigError(
            f"--enable-expert-parallel on CPU: vLLM's CPU fused-MoE kernel cannot place experts on ranks (no "
            f"expert map) and crashes on the MoE layer(s) {dense} this checkpoint leaves dense. Serve with "
            "--tensor-parallel-size alone (the same split of the compressed layers), or compress every MoE layer.")


def _refuse_non_finite(name: str, tensor) -> None:
    """Raise, naming `name`, if the floating-point `tensor` holds a NaN or an Inf.

    One pass with `aminmax` (NaN propagates to both results, an Inf shows as the min or the max):
    measured 10-20x faster on CPU than `isfinite(t).all()`, which writes a mask the size of the tensor.
    """
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if all(bool(torch.isfinite(bound)) for bound in torch.aminmax(tensor)):
        return
    from moesvd_vllm.errors import CheckpointError

    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise CheckpointError(
        f"tensor {name}: {nan} NaN and {inf} Inf value(s) in the checkpoint; a compressed checkpoint must be "
        "finite. Re-create it with `moesvd compress` (or restore the damaged shard).")


def _rank_layers(model) -> range:
    inner = getattr(model, "model", None)
    start, end = getattr(inner, "start_layer", None), getattr(inner, "end_layer", None)
    if start is None or end is None:
        return range(model.config.num_hidden_layers)
    return range(start, end)


def load_compressed_weights(model, load_stock: Callable[[Iterable], Iterable[str]],
                            weights: Iterable[tuple[str, "object"]]) -> set[str]:
    """`model.load_weights` of a plugin class (see the module docstring); returns the loaded names."""
    from moesvd_vllm.architectures import moe_dims, moe_layout
    from moesvd_vllm.layers import SharedBasisExperts
    from moesvd_vllm.loading import CompressedCheckpointValidator

    quant_config = model.moesvd_config
    compression = quant_config.compression
    bases = {}  # checkpoint name -> (parameter name, parameter)
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, SharedBasisExperts) and method.has_bases:
            for basis, checkpoint_name in method.checkpoint_names.items():
                bases[checkpoint_name] = (f"{module_name}.{basis}.weight", getattr(module, basis).weight)
    config = model.config.to_dict()
    validator = CompressedCheckpointValidator(config["model_type"], compression, moe_dims(config),
                                              _rank_layers(model))
    moe_module = moe_layout(config["model_type"]).moe_module
    decomposed = tuple(f"model.layers.{index}.{moe_module}." for index in compression.decomposed_layers)
    loaded: set[str] = set()

    def checked(stream: Iterable) -> Iterator:
        for name, tensor in validator.inspect(stream):
            if name.startswith(decomposed):
                _refuse_non_finite(name, tensor)
            target = bases.get(name)
            if target is None:
                yield name, tensor
                continue
            param_name, param = target
            param.weight_loader(param, tensor)
            loaded.add(param_name)

    loaded.update(load_stock(checked(weights)))
    validator.finish()
    return loaded


def plugin_class(plugin_name: str) -> type:
    """`plugin_name` as a subclass of vLLM's class for its original architecture."""
    from vllm import ModelRegistry

    stock = ModelRegistry._try_load_model_cls(original_architecture(plugin_name))
    if stock is None:
        raise AttributeError(f"vLLM could not load the model class of {plugin_name}")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        install_compression(vllm_config)
        stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.moesvd_config = vllm_config.quant_config

    def load_weights(self, weights):
        return load_compressed_weights(self, lambda stream: stock.load_weights(self, stream), weights)

    doc = (f"vLLM architecture `{plugin_name}`: vLLM's {stock.__name__} with MoE-SVD compressed routed "
           "experts (moesvd_vllm.models).")
    return type(plugin_name, (stock,), {"__init__": __init__, "load_weights": load_weights,
                                        "__module__": __name__, "__qualname__": plugin_name, "__doc__": doc})


def __getattr__(name: str) -> type:
    if name not in PLUGIN_CLASS_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = plugin_class(name)
    globals()[name] = cls
    return cls
