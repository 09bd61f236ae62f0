"""The format contract of format versions 2 (kept intermediate neurons, layers without bases) and 4
(group-wise bases)."""

import pytest

from moesvd_vllm.architectures import MoEDims

from moesvd_vllm.format.schema import (

    CONFIG_KEY,

    LayerSpec,

    MoESVDConfig,

    SchemaError,

    decomposed_layer_params,

    expected_layer_tensors,

)

DIMS = MoEDims(num_experts=4, top_k=2, hidden=128, intermediate=256)


def _spec(**kwargs):
    values = dict(form="shared_basis", rank=128, num_experts=4, bank_map=[0, 1, 2, 3])
    values.update(kwargs)
    return LayerSpec(**values)


def test_kept_intermediate_shapes_the_factors_and_the_count():
    spec = _spec(rank=96, intermediate=160)
    tensors = expected_layer_tensors("qwen3_moe", 0, spec, DIMS, "float32")
    assert tensors["model.layers.0.mlp.experts.3.gate_proj.weight"][0] == (160, 96)
    assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"][0] == (96, 160)
    assert decomposed_layer_params(spec, DIMS) == 2 * 96 * 128 + 4 * 3 * 160 * 96


def test_a_layer_without_bases_stores_only_the_factors():
    spec = _spec(intermediate=192, bases=False)
    tensors = expected_layer_tensors("qwen3_moe", 2, spec, DIMS, "float32")
    assert not any("moe_svd_" in name for name in tensors)
    assert tensors["model.layers.2.mlp.experts.0.up_proj.weight"][0] == (192, 128)
    assert decomposed_layer_params(spec, DIMS) == 4 * 3 * 192 * 128


@pytest.mark.parametrize("kwargs,message", [
    (dict(intermediate=100), "multiple of 8"),
    (dict(intermediate=-16), "multiple of 8"),
    (dict(form="per_expert", intermediate=128), "keeps every intermediate neuron"),
    (dict(form="per_expert", bases=False), "bases"),
])
def test_invalid_layer_specs_are_refused(kwargs, message):
    with pytest.raises(SchemaError, match=message):
        _spec(**kwargs).validate("layer 0")


@pytest.mark.parametrize("kwargs,message", [
    (dict(intermediate=272), "exceeds the model's expert intermediate size 256"),
    (dict(rank=96, bases=False), "needs rank == hidden size 128"),
    (dict(rank=160), "exceeds the hidden size 128"),
])
def test_specs_that_do_not_fit_the_model_are_refused(kwargs, message):
    with pytest.raises(SchemaError, match=message):
        expected_layer_tensors("qwen3_moe", 0, _spec(**kwargs), DIMS, "float32")


def _block(version, layer):
    return {"format_version": version, "method": "moe-svd-stacked",
            "original_architectures": ["Qwen3MoeForCausalLM"], "layers": {"0": layer},
            "params": {"expert_dense": 10, "expert_compressed": 5}}


def test_version_1_blocks_still_read_and_unknown_versions_are_refused():
    old = {"form": "shared_basis", "rank": 64, "num_experts": 4, "bank_map": [0, 1, 2, 3]}
    assert MoESVDConfig.from_dict(_block(1, old)).layer(0).intermediate is None
    new = dict(old, intermediate=128, bases=True)
    assert MoESVDConfig.from_dict(_block(2, new)).layer(0).intermediate == 128
    with pytest.raises(SchemaError, match=f"{CONFIG_KEY}.format_version: 5"):
        MoESVDConfig.from_dict(_block(5, new))


# ------------------------------------------------------------------------------ group-wise bases (version 4)
def test_group_wise_bases_are_stacked_and_counted_once_per_group():
    spec = _spec(rank=64, basis_groups=2)
    tensors = expected_layer_tensors("qwen3_moe", 1, spec, DIMS, "float32")
    assert tensors["model.layers.1.mlp.moe_svd_in.weight"][0] == (2 * 64, 128)
    assert tensors["model.layers.1.mlp.moe_svd_out.weight"][0] == (128, 2 * 64)
    assert tensors["model.layers.1.mlp.experts.3.gate_proj.weight"][0] == (256, 64)
    assert decomposed_layer_params(spec, DIMS) == 2 * (2 * 64 * 128) + 4 * 3 * 256 * 64
    assert [spec.group_of_expert(e) for e in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(basis_groups=3), "4 experts do not split into 3 equal groups"),
    (dict(basis_groups=0), "positive integer"),
    (dict(basis_groups=2, bases=False, intermediate=128), "need the shared_basis form with bases"),
    (dict(basis_groups=2, bank_map=[0, 1, 1, 2]), "bank 1 serves experts of basis groups 1 and 0 .expert 1."),
])
def test_invalid_group_wise_specs_are_refused(kwargs, message):
    with pytest.raises(SchemaError, match=message):
        _spec(**kwargs).validate("layer 0")


def test_group_wise_bases_need_format_version_4_and_one_group_is_not_written():
    grouped = {"form": "shared_basis", "rank": 64, "num_experts": 4, "bank_map": [0, 0, 1, 1], "basis_groups": 2}
    assert MoESVDConfig.from_dict(_block(4, grouped)).layer(0).basis_groups == 2
    with pytest.raises(SchemaError, match="basis_groups: needs format_version >= 4, the block says 3"):
        MoESVDConfig.from_dict(_block(3, grouped))
    single = MoESVDConfig.from_dict(_block(3, dict(grouped, bank_map=[0, 1, 2, 3], basis_groups=1)))
    assert "basis_groups" not in single.to_dict()["layers"]["0"]  # readers before version 4 read it
