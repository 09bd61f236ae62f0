"""The fixture builders: tiny random checkpoints of every architecture and the benchmark-shape models."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES, moe_dims, moe_layer_indices, moe_layout
from offline.fixtures.bench_shapes import bench_config, build_bench_model, planned_bytes
from offline.fixtures.tiny import DEFAULT_INIT_STD, TINY_ARCHS, build_tiny_checkpoint
from offline.fixtures.tokenizer import VOCAB_SIZE
from tests.support.tolerance import sample_std_tolerance

EXPECTED_ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "phimoe": "PhiMoEForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}
FIRST_LAYER_DENSE = ("deepseek_v2", "deepseek_v3", "glm4_moe")
PROMPT = ("In the beginning God created the heaven and the earth. And the earth was without form, and "
          "void; and darkness was upon the face of the deep.")


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def disk_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update((name, f.get_tensor(name)) for name in f.keys())
    return out


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def load_transformers(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                       output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported {problems} for {model_dir}"
    return model.eval()


def prompt_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids


def test_all_architectures_are_offered():
    assert set(TINY_ARCHS) == set(EXPECTED_ARCHITECTURES)
    # Every fixture architecture has a plugin name (the schema also accepts aliases such as
    # transformers' spelling PhimoeForCausalLM).
    assert set(EXPECTED_ARCHITECTURES.values()) <= set(PLUGIN_ARCHITECTURES)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_config_matches_the_schema_contract(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    config = read_config(model_dir)
    assert config["architectures"] == [EXPECTED_ARCHITECTURES[arch]]
    assert config["model_type"] == arch
    assert config["vocab_size"] == VOCAB_SIZE and config["hidden_size"] % 32 == 0
    dims = moe_dims(config)
    assert (dims.num_experts, dims.top_k, dims.hidden, dims.intermediate) == (8, 2, 128, 128)
    expected_moe_layers = [1, 2, 3] if arch in FIRST_LAYER_DENSE else [0, 1, 2, 3]
    assert moe_layer_indices(config) == expected_moe_layers
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_experts_use_the_hub_per_expert_tensor_names(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    config = read_config(model_dir)
    layout, dims = moe_layout(arch), moe_dims(config)
    tensors = disk_tensors(model_dir)
    for layer in moe_layer_indices(config):
        prefix = f"model.layers.{layer}.{layout.moe_module}"
        assert tensors[f"{prefix}.{layout.router}.weight"].shape == (dims.num_experts, dims.hidden)
        for e in range(dims.num_experts):
            for proj, shape in ((layout.gate_proj, (dims.intermediate, dims.hidden)),
                                (layout.up_proj, (dims.intermediate, dims.hidden)),
                                (layout.down_proj, (dims.hidden, dims.intermediate))):
                assert tensors[f"{prefix}.experts.{e}.{proj}.weight"].shape == shape
    assert not [n for n in tensors if "gate_up_proj" in n or n.endswith("experts.down_proj")], \
        "fused (transformers in-memory) expert tensors must not be on disk"
    if arch in FIRST_LAYER_DENSE:  # first_k_dense_replace=1: layer 0 is a dense MLP
        assert "model.layers.0.mlp.gate_proj.weight" in tensors
        assert not [n for n in tensors if n.startswith("model.layers.0.mlp.experts.")]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loads_in_transformers_with_finite_peaked_logits(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    model = load_transformers(model_dir)
    ids = prompt_ids(model_dir)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    top_prob = logits.softmax(-1).max(-1).values
    # uniform would be 1/512; the sharpened init makes the next-token distribution peaked
    assert top_prob.mean() > 20 / VOCAB_SIZE, top_prob.mean()
    assert logits.argmax(-1).unique().numel() > ids.shape[1] // 4, "next-token argmax barely varies"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_routing_is_not_degenerate(arch, tiny_model_dir):
    """Route the prompt with the on-disk router weights: most experts are used, none dominates."""
    model_dir = tiny_model_dir(arch)
    config = read_config(model_dir)
    layout, dims = moe_layout(arch), moe_dims(config)
    tensors = disk_tensors(model_dir)
    model = load_transformers(model_dir)
    router_inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    hooks = [layers[i].post_attention_layernorm.register_forward_hook(
        lambda _m, _inp, out, i=i: router_inputs.__setitem__(i, out[0].detach()))
        for i in moe_layer_indices(config)]
    with torch.no_grad():
        model(prompt_ids(model_dir))
    for hook in hooks:
        hook.remove()
    for layer, x in router_inputs.items():
        router = tensors[f"model.layers.{layer}.{layout.moe_module}.{layout.router}.weight"]
        chosen = (x @ router.T).topk(dims.top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=dims.num_experts)
        assert (counts > 0).sum() >= dims.num_experts - 2, f"layer {layer}: usage {counts.tolist()}"
        assert counts.max() <= 0.5 * chosen.numel(), f"layer {layer}: usage {counts.tolist()}"


def test_phimoe_keeps_the_hub_biases_with_a_zero_lm_head_bias(tiny_model_dir):
    """vLLM 0.32's PhiMoE never adds lm_head.bias; the fixture keeps the tensor but makes it zero."""
    tensors = disk_tensors(tiny_model_dir("phimoe"))
    assert torch.count_nonzero(tensors["lm_head.bias"]) == 0
    assert torch.count_nonzero(tensors["model.layers.0.self_attn.o_proj.bias"]) > 0
    assert torch.count_nonzero(tensors["model.norm.bias"]) > 0


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    first = build_tiny_checkpoint("qwen3_moe", tmp_path / "a", seed=3)
    second = build_tiny_checkpoint("qwen3_moe", tmp_path / "b", seed=3)
    other = build_tiny_checkpoint("qwen3_moe", tmp_path / "c", seed=4)
    assert file_hashes(first) == file_hashes(second)
    assert file_hashes(first)["model.safetensors"] != file_hashes(other)["model.safetensors"]
    assert file_hashes(first)["tokenizer.json"] == file_hashes(other)["tokenizer.json"]


def test_init_std_and_dtype_are_applied(tmp_path):
    path = build_tiny_checkpoint("mixtral", tmp_path / "m", init_std=0.05, dtype="bfloat16", num_layers=2)
    tensors = disk_tensors(path)
    expert = tensors["model.layers.1.block_sparse_moe.experts.7.w2.weight"]
    assert expert.dtype == torch.bfloat16
    std_tolerance = sample_std_tolerance(expert.numel(), expert.dtype)  # 6 standard errors + bf16 rounding
    assert expert.float().std().item() == pytest.approx(0.05, rel=std_tolerance)
    assert read_config(path)["num_hidden_layers"] == 2 and read_config(path)["torch_dtype"] == "bfloat16"
    assert not any(n.startswith("model.layers.2.") for n in tensors)
    assert DEFAULT_INIT_STD > 0.05  # the default is the sharpened init


def test_rebuild_replaces_a_fixture_but_never_a_foreign_directory(tmp_path):
    path = build_tiny_checkpoint("olmoe", tmp_path / "olmoe", seed=0)
    build_tiny_checkpoint("olmoe", path, seed=1)  # a fixture directory may be rebuilt in place
    assert json.loads((path / "moesvd_fixture.json").read_text())["seed"] == 1
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by the fixture builders"):
        build_tiny_checkpoint("olmoe", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left over"


def test_unknown_architecture_is_rejected_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="qwen3_moe"):
        build_tiny_checkpoint("llama", tmp_path / "x")


def test_tokenizer_round_trips_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3_moe"))
    text = "Hello, world! Grüße — 123"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.eos_token_id == 0
    assert len(ids) < len(text.encode())  # BPE merges, not raw bytes


# ---------------------------------------------------------------- benchmark-shape models

SHRINK = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
          "dense_intermediate_size": 128}


def test_bench_configs_have_the_real_layer_shapes():
    qwen = bench_config("qwen3-30b-a3b", layers=8)
    assert qwen["architectures"] == ["Qwen3MoeForCausalLM"] and qwen["num_hidden_layers"] == 8
    assert moe_dims(qwen) == type(moe_dims(qwen))(num_experts=128, top_k=8, hidden=2048, intermediate=768)
    assert (qwen["num_attention_heads"], qwen["num_key_value_heads"], qwen["head_dim"]) == (32, 4, 128)
    assert qwen["torch_dtype"] == "bfloat16"
    mixtral = bench_config("mixtral-8x7b", layers=2)
    assert mixtral["architectures"] == ["MixtralForCausalLM"]
    assert moe_dims(mixtral) == type(moe_dims(mixtral))(num_experts=8, top_k=2, hidden=4096,
                                                        intermediate=14336)
    assert (mixtral["num_attention_heads"], mixtral["num_key_value_heads"]) == (32, 8)
    # one Mixtral layer in bfloat16: 8 experts x 3 x 14336 x 4096 x 2 bytes plus attention
    expert_bytes = 8 * 3 * 14336 * 4096 * 2
    per_layer = planned_bytes(bench_config("mixtral-8x7b", layers=2)) - planned_bytes(
        bench_config("mixtral-8x7b", layers=1))
    assert expert_bytes < per_layer < expert_bytes * 1.05


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_bench_builder_runs_shrunk_and_loads_in_transformers(shape, tmp_path):
    path = build_bench_model(shape, tmp_path / shape, layers=2, overrides=SHRINK, dtype="float32")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = disk_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(list(path.glob("model-*-of-00004.safetensors"))) == 4  # embedding, 2 layers, head
    model = load_transformers(path)
    with torch.no_grad():
        logits = model(prompt_ids(path)).logits
    assert torch.isfinite(logits).all()
    again = build_bench_model(shape, tmp_path / "again", layers=2, overrides=SHRINK, dtype="float32")
    assert {k: v for k, v in file_hashes(path).items()} == file_hashes(again)


def test_bench_builder_writes_bfloat16_by_default(tmp_path):
    path = build_bench_model("qwen3-30b-a3b", tmp_path / "q", layers=1, overrides=SHRINK)
    tensors = disk_tensors(path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    up = tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    assert math.isclose(up.float().std().item(), 0.02, rel_tol=sample_std_tolerance(up.numel(), up.dtype))


def test_bench_builder_rejects_unknown_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown override"):
        build_bench_model("mixtral-8x7b", tmp_path / "m", layers=1, overrides={"num_expert": 4})
    assert not (tmp_path / "m").exists()
