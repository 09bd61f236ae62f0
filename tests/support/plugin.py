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
    non_finite        full_rank with one NaN and one Inf in a factor of layer 1 (headers are fine)
    format_v1         full_rank as format version 1 wrote it (no `intermediate` / `bases` keys)
    per_expert        the per_expert (baseline) form, which only the PyTorch reference evaluates

`compressed_checkpoint(arch, recipe)` (session fixture) runs `moesvd compress` (offline.compress) on the
tiny fixture of `arch` with one of RECIPES, once per session.

`score(server, prompt_ids)` asks a running server for the prompt logprobs and greedy continuation of
token-id prompts; `reference_score(model, prompt_ids)` does the same with a PyTorch model.
`served_scores(model_dir, **server_options)` (session fixture) serves a checkpoint once per distinct
options, scores PROMPTS and stops the server; test files share the result (TP=2 tests compare against
the TP=1 scores another file already measured).
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
from serve.launch import ServerOptions, VLLMServer
from tests.support.servers import server_options_for_tests

DECOMPOSED_LAYERS = (0, 1, 2)
BANK_MAPS = {1: (0, 0, 0, 1, 1, 1, 2, 2)}
PROMPTS = (
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses, Go in unto Pharaoh",
    "Blessed are the poor in spirit: for theirs is the kingdom",
)
MAX_TOKENS = 8
REFERENCE_TOLERANCE = 1e-3  # plugin vs PyTorch reference in float32 (issue 12's bound)
KINDS = ("full_rank", "expanded_dense", "transposed_basis", "missing_tensor", "wrong_rank",
         "unknown_version", "truncated_shard", "non_finite", "format_v1", "per_expert")
CALIB = Path(__file__).resolve().parents[2] / "offline" / "bundled" / "kjv_text" / "validation.txt"
# `moesvd compress` recipes the tiny fixtures reach (8 experts, H = I = 128):
#   banks:   the paper's method: U-trimming into 2 banks per layer, 64 of 128 neurons kept, rank 32 < H
#            with shared bases
#   neurons: the default method in steps of 8 neurons at a light ratio: neuron selection only
#            (80-88 of 128 neurons), no bases (`bases: false`)
#   groups:  the default method with group-wise bases (4 groups of 2 experts), rank only
#   d4:      the paper's App. D.4: 2 groups of 4 experts, each with its most frequent expert's bases and
#            U-trimming to 2 banks inside the group
RECIPES = {
    "banks": dict(method="moe-svd", ratio=0.5, ratio_tolerance=0.05, min_intermediate_fraction=0.5),
    "neurons": dict(method="moe-svd-stacked", ratio=0.35, ratio_tolerance=0.05, intermediate_step=8),
    "groups": dict(method="moe-svd-stacked", ratio=0.5, ratio_tolerance=0.05, basis_groups=4,
                   min_intermediate_fraction=1.0),
    "d4": dict(method="moe-svd", ratio=0.5, ratio_tolerance=0.05, basis_groups=2, trim_group_size=4),
}
# DeepSeek's multi-head latent attention: vLLM 0.32's CPU MLA and transformers 5.19 apply MLA's
# interleaved RoPE differently (tests/test_vllm_serving_stock.py, KNOWN_MISMATCH) and agree exactly once
# the RoPE parts of the query and of the shared key projection are zero. Served-vs-reference tests of
# these architectures compress a copy of the fixture with those parts zeroed (attention still runs, on
# the non-rotary part; routing, shared experts and the dense first layer are untouched).
MLA_ARCHS = ("deepseek_v2", "deepseek_v3")
TP2 = dict(extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


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


def reference_difference(model_dir: Path, served: list[Scored], dtype: str = "float32") -> float:
    """Max |logprob diff| of served scores against offline.reference (asserts equal greedy tokens)."""
    from offline.reference import load_reference_model

    reference = reference_score(load_reference_model(model_dir, dtype=dtype).eval(),
                                prompt_token_ids(model_dir))
    assert same_greedy_tokens(served, reference), "greedy tokens differ from the PyTorch reference"
    return max_logprob_difference(served, reference)


def float32_tolerance(model_dir: Path, scores: list[Scored]) -> float:
    """Tolerance on max |logprob diff| of two float32 evaluations of `model_dir` on the compared prompts and
    greedy continuations: SAFETY x the model's measured float32 noise (tests/support/tolerance.py), and never
    looser than issue 12's contract of REFERENCE_TOLERANCE."""
    from tests.support.tolerance import served_logprob_tolerance

    sequences = [ids + s.tokens for ids, s in zip(prompt_token_ids(model_dir), scores, strict=True)]
    return min(REFERENCE_TOLERANCE, served_logprob_tolerance(model_dir, sequences))


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


def _poison_one_factor(tensors: dict) -> None:
    name = next(n for n in sorted(tensors) if n.startswith("model.layers.1.") and ".experts.1." in n)
    poisoned = tensors[name].clone()
    poisoned[0, 0] = float("nan")
    poisoned[-1, -1] = float("inf")
    tensors[name] = poisoned


def _as_format_v1(config: dict) -> None:
    block = config["moe_svd"]
    block["format_version"] = 1
    for spec in block["layers"].values():
        assert spec.pop("intermediate") is None and spec.pop("bases") is True, "not a v1-expressible layer"


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
    elif kind == "non_finite":
        _edit_tensors(out, _poison_one_factor)
    elif kind == "format_v1":
        _edit_config(out, _as_format_v1)
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


def non_finite_tensor_name(model_dir: Path) -> str:
    """The tensor `_poison_one_factor` poisons in `model_dir` (a full_rank checkpoint)."""
    from safetensors import safe_open

    with safe_open(str(_shard(model_dir)), "pt") as f:
        return next(n for n in sorted(f.keys()) if n.startswith("model.layers.1.") and ".experts.1." in n)


def arch_server_options(arch: str) -> dict:
    """Server options an architecture needs here: on CPUs with AMX vLLM 0.32 picks its AMX_MLA backend,
    which rejects float32 weights; the reference CPU_MLA backend serves float32."""
    import torch

    if arch in MLA_ARCHS and not torch.cuda.is_available():
        return {"extra_args": ["--attention-backend", "CPU_MLA"]}
    return {}


def zero_mla_rope(source: Path, out: Path) -> Path:
    """Copy of the MLA checkpoint `source` whose query / shared-key RoPE parts are zero (see MLA_ARCHS)."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    heads, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    rope, kv_rank = config["qk_rope_head_dim"], config["kv_lora_rank"]

    def edit(tensors: dict) -> None:
        for name in list(tensors):
            weight = tensors[name]
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
                per_head = weight.clone().view(heads, nope + rope, -1)
                per_head[:, nope:] = 0
                tensors[name] = per_head.view_as(weight).contiguous()
            elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
                weight = weight.clone()
                weight[kv_rank:] = 0
                tensors[name] = weight

    _edit_tensors(out, edit)
    return out


@pytest.fixture(scope="session")
def compressed_checkpoint(tiny_model_dir, tmp_path_factory) -> Callable[..., Path]:
    """Factory: `compressed_checkpoint(arch, recipe="banks", dtype="float32")` -> `moesvd compress` output."""
    from offline.compress import CompressionOptions, compress

    root = tmp_path_factory.mktemp("compressed")
    built: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, recipe: str = "banks", dtype: str = "float32") -> Path:
        key = (arch, recipe, dtype)
        if key not in built:
            options = CompressionOptions(calib=str(CALIB), num_samples=8, seq_len=32, batch_size=4,
                                         **RECIPES[recipe])
            fixture = tiny_model_dir(arch, **({} if dtype == "float32" else {"dtype": dtype}))
            if arch in MLA_ARCHS:
                fixture = zero_mla_rope(fixture, root / f"{arch}-{dtype}-rope-zeroed")
            built[key] = compress(fixture, root / f"{arch}-{recipe}-{dtype}", options)
        return built[key]

    return get


@dataclass
class Served:
    scores: list[Scored]
    startup_seconds: float


def serve_options(model_dir: Path, **options) -> ServerOptions:
    return server_options_for_tests(model_dir, **options)


def _options_key(model_dir: Path, options: dict) -> tuple:
    return (str(model_dir),) + tuple(sorted((k, repr(v)) for k, v in options.items()))


@pytest.fixture(scope="session")
def served_scores() -> Callable[..., Served]:
    """Factory: `served_scores(model_dir, **ServerOptions fields)` -> Served (cached per options).

    `served_scores.record(model_dir, server, **options)` stores the scores of a server a test keeps
    running for other checks, so that the same options are not served twice.
    """
    cache: dict[tuple, Served] = {}

    def get(model_dir: Path, **options) -> Served:
        key = _options_key(model_dir, options)
        if key not in cache:
            with VLLMServer(serve_options(model_dir, **options)) as server:
                cache[key] = Served(score(server, prompt_token_ids(model_dir)), server.startup_seconds)
        return cache[key]

    def record(model_dir: Path, server: VLLMServer, **options) -> Served:
        key = _options_key(model_dir, options)
        if key not in cache:
            cache[key] = Served(score(server, prompt_token_ids(model_dir)), server.startup_seconds)
        return cache[key]

    get.record = record
    return get
