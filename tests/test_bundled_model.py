"""The bundled demo model: shape, files, what it learned (perplexity, routing), corpus split, packaging, vLLM."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from offline.bundled import (
    SPLITS,
    TRAINING_RECORD,
    bundled_model_dir,
    corpus_split_path,
    read_documents,
)
from offline.bundled.corpus import SplitRule, chapters_from_verse_lines
from tests.support.tolerance import served_logprob_tolerance
from offline.bundled.evaluate import (
    TRAIN_SEQ_LEN,
    load_model,
    load_tokenizer,
    model_nll,
    routing_frequencies,
    split_windows,
    token_stream,
    unigram_log_probs,
    unigram_nll,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_WEIGHTS_BYTES = 32 * 1024 * 1024
TEST_WINDOWS = 24  # a prefix of the test split: 24 x 256 tokens keeps the live evaluation to seconds
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(bundled_model_dir())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_model_dir())


@pytest.fixture(scope="module")
def test_windows(tokenizer) -> torch.Tensor:
    return split_windows(token_stream(tokenizer, read_documents("test")), TRAIN_SEQ_LEN, TEST_WINDOWS)


@pytest.fixture(scope="module")
def unigram(tokenizer, model) -> torch.Tensor:
    return unigram_log_probs(token_stream(tokenizer, read_documents("train")), model.config.vocab_size)


def perplexity(total_nll: float, count: int) -> float:
    return float(torch.tensor(total_nll / count).exp())


def test_config_is_a_real_moe_in_the_required_shape():
    config = json.loads((bundled_model_dir() / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["num_local_experts"] >= 8 and config["num_experts"] == config["num_local_experts"]
    assert config["num_experts_per_tok"] >= 2
    assert config["num_hidden_layers"] >= 4
    assert config["hidden_size"] >= 128
    for key in ("hidden_size", "moe_intermediate_size", "intermediate_size", "head_dim"):
        assert config[key] % 32 == 0, key
    assert config["head_dim"] in (32, 64)
    assert config["mlp_only_layers"] == [] and config["decoder_sparse_step"] == 1  # every layer is MoE


def test_files_present_float32_and_within_size_limit():
    model_dir = bundled_model_dir()
    for name in REQUIRED_FILES:
        assert (model_dir / name).is_file(), name
    weights = model_dir / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    with safe_open(str(weights), "pt") as handle:
        names = list(handle.keys())
        dtypes = {handle.get_slice(name).get_dtype() for name in names}
    assert dtypes == {"F32"}
    assert any(".mlp.experts.7.gate_proj.weight" in name for name in names)


def test_tokenizer_loads_in_transformers_and_round_trips(tokenizer):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    text = read_documents("test")[0][:2000]
    ids = tokenizer.encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token == "<|endoftext|>"
    assert 2048 <= tokenizer.get_vocab_size() <= 4096


def test_test_perplexity_is_at_most_a_third_of_unigram(model, test_windows, unigram):
    model_ppl = perplexity(*model_nll(model, test_windows))
    unigram_ppl = perplexity(*unigram_nll(unigram, test_windows))
    assert model_ppl <= unigram_ppl / 3, (model_ppl, unigram_ppl)


def test_the_perplexity_check_fails_for_an_untrained_model_of_the_same_shape(model, test_windows, unigram):
    """The check above must be able to fail: the same architecture with fresh weights does not pass it."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    untrained = Qwen3MoeForCausalLM(model.config).eval()
    model_ppl = perplexity(*model_nll(untrained, test_windows[:4]))
    unigram_ppl = perplexity(*unigram_nll(unigram, test_windows[:4]))
    assert model_ppl > unigram_ppl / 3


def test_routing_uses_most_experts_but_not_uniformly(model, test_windows):
    """Layers 1-3 of the committed model each have one nearly unused expert (see docs/bundled-model.md)."""
    routing = routing_frequencies(model, test_windows)
    assert len(routing) == model.config.num_hidden_layers
    for layer in routing:
        in_use = sum(freq > 0.01 for freq in layer.frequencies)
        assert in_use >= model.config.num_experts - 2, layer
        assert layer.entropy_ratio < 0.99, layer  # not uniform (1.0 would be)
        assert max(layer.frequencies) < 0.6, layer  # no collapse onto one expert
    assert max(layer.max_over_min for layer in routing) >= 1.5, routing


def test_splits_are_disjoint_and_follow_the_chapter_rule():
    documents = {split: read_documents(split) for split in SPLITS}
    counts = {split: len(docs) for split, docs in documents.items()}
    assert counts == {"train": 1071, "validation": 59, "test": 59}
    seen: dict[str, str] = {}
    for split, docs in documents.items():
        for doc in docs:
            assert seen.setdefault(doc, split) == split, "a chapter is in two splits"
    assert SplitRule().split_of(18) == "validation" and SplitRule().split_of(39) == "test"
    assert documents["validation"][0].startswith("And there came two angels to Sodom")  # Genesis 19
    assert documents["test"][0].startswith("And Abraham journeyed from thence")  # Genesis 20


def test_verse_lines_become_one_paragraph_per_chapter():
    lines = ["Ge1:1 In the beginning", "Ge1:2 And the  earth.", "Ge2:1 Thus the heavens.",
             "1Co13:4 Charity suffereth long,", "1Co13:5 Doth not behave itself."]
    assert chapters_from_verse_lines(lines) == [
        "In the beginning And the earth.", "Thus the heavens.",
        "Charity suffereth long, Doth not behave itself."]
    with pytest.raises(ValueError, match="not a verse line"):
        chapters_from_verse_lines(["Genesis"])


def test_training_record_matches_the_committed_model():
    record = json.loads(TRAINING_RECORD.read_text())
    config = json.loads((bundled_model_dir() / "config.json").read_text())
    assert record["options"]["shape"]["num_experts"] == config["num_local_experts"]
    assert record["options"]["seq_len"] == TRAIN_SEQ_LEN
    assert len(record["loss_curve"]) >= 10
    first, last = record["loss_curve"][0], record["loss_curve"][-1]
    assert last["step"] == record["options"]["steps"]
    assert last["val_loss"] < first["val_loss"]


def test_package_data_globs_cover_the_bundled_files():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["*"]
    shipped = [*(bundled_model_dir() / name for name in REQUIRED_FILES),
               *(corpus_split_path(split) for split in SPLITS), TRAINING_RECORD]
    for path in shipped:
        assert any(fnmatch.fnmatch(path.name, glob) for glob in globs), path


@pytest.mark.slow  # stock vLLM serving is in the default set through moe_fine (tests/test_bundled_fine_model.py)
def test_stock_vllm_serves_it_with_the_same_greedy_tokens_and_logprobs(vllm_server, model, tokenizer):
    """vLLM's own Qwen3MoeForCausalLM (no plugin code involved) reproduces transformers in float32."""
    from serve.http import post_json

    server = vllm_server(bundled_model_dir())
    prompt_ids = tokenizer.encode(read_documents("test")[3][:300]).ids
    max_tokens = 16
    answer = post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
        "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True,
    })
    choice = answer["choices"][0]
    served_ids = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
    served_logprobs = torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64)

    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):  # plain greedy decoding, end-of-text included like ignore_eos
            logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0].double()
            generated.append(int(logits[-1].argmax()))
        logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0].double()
    reference_logprobs = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1].gather(
        1, torch.tensor(generated)[:, None])[:, 0]
    assert served_ids == generated
    # float32 on both sides, vLLM's kernels sum in other orders: SAFETY x the model's float32 noise
    tolerance = served_logprob_tolerance(bundled_model_dir(), [prompt_ids + generated])
    assert torch.allclose(served_logprobs, reference_logprobs, rtol=0, atol=tolerance), (
        served_logprobs, reference_logprobs, tolerance)
