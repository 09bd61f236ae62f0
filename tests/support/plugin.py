"""Checkpoints and scoring helpers for the vLLM plugin tests (tests/test_plugin.py).

`plugin_checkpoint(kind, arch="qwen3_moe")` (session fixture) builds, once per session, from the tiny
sharpened fixture of `arch`:

    full_rank         exact shared_basis conversion (random orthogonal bases, r = H) of layers 0-2 with
                      3 banks in layer 1 (experts 0-2, 3-5, 6-7 share factors), layer 3 left dense
    expanded_dense    the original architecture that full_rank equals exactly (bank experts duplicated)
    transposed_basis  full_rank with layer 0's input basis transposed: a wiring error that loads fine
    missing_tensor    full_rank without one factor of layer 1 (removed from shard and index)
    wrong_rank        full_rank whose config says rank 96 for layer 2 (the tensors have 128)
    unknown_version   full_rank with moe_svd.format_version 99
    truncated_shard   full_rank with its shard cut to 60 % of its bytes
    per_expert        the per_expert (baseline) form, which only the PyTorch reference evaluates

`score(server, prompt_ids)` asks a running server for the prompt logprobs and greedy continuation of
token-id prompts; `reference_score(model, prompt_ids)` does the same with a PyTorch model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline.full_rank import write_expanded_dense_checkpoint, write_full_rank_checkpoint
from serve.http import post_json
from serve.launch import VLLMServer

DECOMPOSED_LAYERS = (0, 1, 2)
BANK_MAPS = {1: (0, 0, 0, 1, 1, 1, 2, 2)}
PROMPTS = (
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses, Go in unto Pharaoh",
    "Blessed are the poor in spirit: for theirs is the kingdom",
)
MAX_TOKENS = 8
KINDS = ("full_rank", "expanded_dense", "transposed_basis", "missing_tensor", "wrong_rank",
         "unknown_version", "truncated_shard", "per_expert")


@dataclass
class Scored:
    """One prompt: logprobs of prompt tokens 1..n-1 (teacher forced), greedy tokens and their logprobs."""

    prompt_logprobs: list[float]
    tokens: list[int]
    token_logprobs: list[float]


def prompt_token_ids(model_dir: Path, prompts=PROMPTS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in prompts]


def score(server: VLLMServer, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[Scored]:
    out = []
    for ids in prompt_ids:
        response = post_json(server.url("/v1/completions"), {
            "model": server.name, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0, "prompt_logprobs": 0, "return_tokens_as_token_ids": True})
        choice = response["choices"][0]
        prompt_logprobs = [_logprob_of(entry, token) for entry, token in
                           zip(choice["prompt_logprobs"][1:], ids[1:])]
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        out.append(Scored(prompt_logprobs, tokens, list(choice["logprobs"]["token_logprobs"])))
    return out


def _logprob_of(entry: dict, token: int) -> float:
    for key, value in entry.items():
        if key.removeprefix("token_id:") == str(token):
            return value["logprob"]
    raise AssertionError(f"prompt token {token} missing from prompt_logprobs entry {entry}")


@torch.no_grad()
def reference_score(model, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[Scored]:
    """The same numbers from a PyTorch causal LM (e.g. offline.reference.load_reference_model)."""
    out = []
    for ids in prompt_ids:
        sequence = torch.tensor([ids])
        logprobs = model(sequence).logits[0].float().log_softmax(-1)
        prompt_logprobs = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
        tokens, token_logprobs = [], []
        for _ in range(max_tokens):
            token = int(logprobs[-1].argmax())
            tokens.append(token)
            token_logprobs.append(float(logprobs[-1, token]))
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            logprobs = model(sequence).logits[0].float().log_softmax(-1)
        out.append(Scored(prompt_logprobs, tokens, token_logprobs))
    return out


def max_logprob_difference(a: list[Scored], b: list[Scored]) -> float:
    """Largest |difference| over prompt logprobs and the generated logprobs of the common greedy prefix."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        pairs = list(zip(x.prompt_logprobs, y.prompt_logprobs, strict=True))
        for tx, ty, lx, ly in zip(x.tokens, y.tokens, x.token_logprobs, y.token_logprobs):
            pairs.append((lx, ly))
            if tx != ty:
                break
        worst = max([worst] + [abs(u - v) for u, v in pairs])
    return worst


def same_greedy_tokens(a: list[Scored], b: list[Scored]) -> bool:
    return all(x.tokens == y.tokens for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------- damaged checkpoint copies

def _shard(model_dir: Path) -> Path:
    shards = sorted(model_dir.glob("*.safetensors"))
    assert len(shards) == 1, f"expected one shard in {model_dir}, found {shards}"
    return shards[0]


def _edit_config(model_dir: Path, edit: Callable[[dict], None]) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def _edit_tensors(model_dir: Path, edit: Callable[[dict], None]) -> None:
    shard = _shard(model_dir)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {name: shard.name for name in sorted(tensors)}
        index.write_text(json.dumps(data, indent=2))


def _transpose_input_basis(tensors: dict) -> None:
    name = next(n for n in tensors if n.startswith("model.layers.0.") and n.endswith("moe_svd_in.weight"))
    tensors[name] = tensors[name].T.contiguous()


def _drop_one_factor(tensors: dict) -> None:
    name = next(n for n in sorted(tensors) if n.startswith("model.layers.1.") and ".experts.2." in n)
    del tensors[name]


def _set_rank(config: dict) -> None:
    config["moe_svd"]["layers"]["2"]["rank"] = 96  # valid for the model (<= H), wrong for the tensors


def _set_version(config: dict) -> None:
    config["moe_svd"]["format_version"] = 99


def _truncate(model_dir: Path) -> None:
    shard = _shard(model_dir)
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])


def build_damaged(source: Path, out: Path, kind: str) -> Path:
    shutil.copytree(source, out)
    if kind == "transposed_basis":
        _edit_tensors(out, _transpose_input_basis)
    elif kind == "missing_tensor":
        _edit_tensors(out, _drop_one_factor)
    elif kind == "wrong_rank":
        _edit_config(out, _set_rank)
    elif kind == "unknown_version":
        _edit_config(out, _set_version)
    elif kind == "truncated_shard":
        _truncate(out)
    else:
        raise ValueError(f"unknown damage {kind!r}")
    return out


@pytest.fixture(scope="session")
def plugin_checkpoint(tiny_model_dir, tmp_path_factory) -> Callable[..., Path]:
    """Factory: `plugin_checkpoint(kind, arch="qwen3_moe")` -> Path (see the module docstring)."""
    root = tmp_path_factory.mktemp("plugin_checkpoints")
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, arch: str = "qwen3_moe") -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
        key = (kind, arch)
        if key in built:
            return built[key]
        dense = tiny_model_dir(arch)
        out = root / f"{arch}-{kind}"
        if kind == "full_rank":
            write_full_rank_checkpoint(dense, out, basis="orthogonal", layers=DECOMPOSED_LAYERS,
                                       bank_map=BANK_MAPS)
        elif kind == "expanded_dense":
            write_expanded_dense_checkpoint(dense, out, bank_map=BANK_MAPS, layers=DECOMPOSED_LAYERS)
        elif kind == "per_expert":
            write_full_rank_checkpoint(dense, out, form="per_expert", layers=DECOMPOSED_LAYERS)
        else:
            build_damaged(get("full_rank", arch), out, kind)
        built[key] = out
        return out

    return get
