"""The architecture table (moesvd_vllm/architectures.py) against transformers' own definitions."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from moesvd_vllm import architectures
from moesvd_vllm.architectures import (
    ARCHITECTURES,
    PLUGIN_ARCHITECTURES,
    Architecture,
    ArchitectureError,
    FirstKDense,
    SparseStep,
    hub_name,
    markdown_table,
    module_moe_block,
    module_name,
    moe_dims,
    moe_layer_indices,
    moe_layout,
    compressed_architectures,
    require_servable,
)
from offline.fixtures.layouts import all_tensor_specs
from offline.fixtures.tiny import TINY_ARCHS, tiny_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def _meta_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def test_every_table_entry_has_a_fixture():
    assert set(TINY_ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_hub_expert_names_are_the_ones_transformers_converts(arch):
    """The per-expert Hub names of the table are what transformers 5.19's conversion mapping fuses
    into experts.gate_up_proj (gate first, then up) and experts.down_proj."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    layout = moe_layout(arch)
    converters = [t for t in get_checkpoint_conversion_mapping(arch) if isinstance(t, WeightConverter)]
    by_target = {tuple(t._original_target_patterns): t._original_source_patterns for t in converters}
    (gate_up,) = [s for target, s in by_target.items() if target[0].endswith("experts.gate_up_proj")]
    (down,) = [s for target, s in by_target.items() if target[0].endswith("experts.down_proj")]
    projection = re.compile(r"experts\.\*\.(\w+)\.weight$")
    assert [projection.search(s).group(1) for s in gate_up] == [layout.gate_proj, layout.up_proj]
    assert [projection.search(s).group(1) for s in down] == [layout.down_proj]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_module_names_are_transformers_parameter_names(arch):
    """Every non-expert Hub tensor of the fixture maps (through transformers' renames) to a parameter or
    buffer of the transformers model, and back; the MoE block path holds `experts` in each MoE layer and
    the layers with experts are exactly the table's MoE layers."""
    config = tiny_config(arch)
    model = _meta_model(config)
    state = set(model.state_dict())
    expert = re.compile(r"\.experts\.\d+\.")
    hub_names = [s.name for s in all_tensor_specs(config) if not expert.search(s.name)]
    modules = {name: module_name(arch, name) for name in hub_names}
    assert sorted(set(modules.values()) - state) == []
    assert all(hub_name(arch, m) == h for h, m in modules.items())
    with_experts = [i for i, layer in enumerate(model.model.layers)
                    if hasattr(model.get_submodule(module_moe_block(arch, i)), "experts")]
    assert with_experts == moe_layer_indices(config)


def test_phimoe_renames_come_from_transformers():
    hub = "model.layers.2.block_sparse_moe.gate.weight"
    assert module_name("phimoe", hub) == "model.layers.2.mlp.router.weight"
    assert hub_name("phimoe", "model.layers.2.mlp.router.weight") == hub
    assert module_name("mixtral", hub) == "model.layers.2.mlp.gate.weight"
    assert module_name("qwen3_moe", "model.layers.2.mlp.gate.weight") == "model.layers.2.mlp.gate.weight"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dims_read_the_table_keys(arch):
    config = tiny_config(arch)
    dims = moe_dims(config)
    assert (dims.num_experts, dims.top_k, dims.hidden, dims.intermediate) == (8, 2, 128, 128)
    model = _meta_model(config)
    experts = model.get_submodule(module_moe_block(arch, moe_layer_indices(config)[0])).experts
    assert tuple(experts.gate_up_proj.shape) == (8, 2 * 128, 128)


def test_moe_layer_rules_by_hand():
    qwen = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert moe_layer_indices(qwen) == [1, 5]
    assert moe_layer_indices({"model_type": "qwen2_moe", "num_hidden_layers": 3}) == [0, 1, 2]
    deepseek = {"model_type": "deepseek_v3", "num_hidden_layers": 8, "first_k_dense_replace": 3,
                "moe_layer_freq": 2}
    assert moe_layer_indices(deepseek) == [4, 6]
    glm = {"model_type": "glm4_moe", "num_hidden_layers": 5, "first_k_dense_replace": 3, "moe_layer_freq": 2}
    assert moe_layer_indices(glm) == [3, 4]  # transformers' and vLLM's glm4_moe ignore moe_layer_freq
    assert moe_layer_indices({"model_type": "mixtral", "num_hidden_layers": 2}) == [0, 1]
    assert isinstance(ARCHITECTURES["qwen3_moe"].moe_layers, SparseStep)
    assert isinstance(ARCHITECTURES["deepseek_v2"].moe_layers, FirstKDense)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ArchitectureError, match=r"'llama' is not a supported.*qwen3_moe"):
        moe_layer_indices({"model_type": "llama", "num_hidden_layers": 2})


def test_plugin_names_are_derived_from_the_table():
    assert PLUGIN_ARCHITECTURES["PhimoeForCausalLM"] == PLUGIN_ARCHITECTURES["PhiMoEForCausalLM"]
    for entry in ARCHITECTURES.values():
        for hub in entry.hub_architectures:
            assert PLUGIN_ARCHITECTURES.get(hub) == entry.plugin_architecture
    assert all(name.startswith("MoESVD") for name in PLUGIN_ARCHITECTURES.values())


def test_require_servable_refuses_an_unservable_type_unless_offline_only(monkeypatch):
    offline = Architecture("offline_moe", ("OfflineMoeForCausalLM",), None, moe_layout("qwen3_moe"),
                           SparseStep(), ARCHITECTURES["qwen3_moe"].routing)
    monkeypatch.setitem(architectures.ARCHITECTURES, "offline_moe", offline)
    with pytest.raises(ArchitectureError, match=r"cannot serve it.*serves: \[.*'qwen3_moe'.*svd, whitened-svd"):
        require_servable("offline_moe")
    assert require_servable("offline_moe", offline_only=True) is offline
    assert require_servable("deepseek_v3").plugin_architecture == "MoESVDDeepseekV3ForCausalLM"


def test_docs_show_the_table():
    text = DOCS.read_text(encoding="utf-8")
    begin, end = "<!-- architectures table: begin -->\n", "<!-- architectures table: end -->"
    assert begin in text and end in text, f"{DOCS} lost its table markers"
    shown = text.split(begin, 1)[1].split(end, 1)[0]
    assert shown == markdown_table(), "docs/architectures.md is out of date: paste markdown_table() into it"


def test_compressed_architectures_name_the_plugin_or_an_offline_only_class(monkeypatch):
    assert compressed_architectures("phimoe", ["PhimoeForCausalLM"]) == ["MoESVDPhiMoEForCausalLM"]
    offline = dataclasses.replace(ARCHITECTURES["qwen3_moe"], plugin_architecture=None)
    monkeypatch.setitem(architectures.ARCHITECTURES, "qwen3_moe", offline)
    assert compressed_architectures("qwen3_moe", ["Qwen3MoeForCausalLM"]) == [
        "MoESVDOfflineOnlyQwen3MoeForCausalLM"]
    with pytest.raises(ArchitectureError, match="MixtralForCausalLM.*not qwen3_moe"):
        compressed_architectures("qwen3_moe", ["MixtralForCausalLM"])


def test_compress_refuses_an_unservable_type_before_any_work(monkeypatch, tiny_model_dir, tmp_path):
    from offline.compress import CompressionOptions, compress

    offline = dataclasses.replace(ARCHITECTURES["qwen3_moe"], plugin_architecture=None)
    monkeypatch.setitem(architectures.ARCHITECTURES, "qwen3_moe", offline)
    # a calibration source that does not exist: reaching the calibration stage would fail differently
    options = CompressionOptions(ratio=0.3, calib=str(tmp_path / "no-such-text.txt"))
    with pytest.raises(ArchitectureError, match="cannot serve it"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
