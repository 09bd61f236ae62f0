"""Evaluate the bundled model: perplexity vs a unigram baseline, and how its router spreads tokens.

    python -m offline.bundled.evaluate [--model-dir DIR] [--max-windows N] [--json OUT.json]

Perplexity is measured with the model in float32 by `offline.eval_ppl.summed_nll` (the one perplexity
implementation: log-softmax in float64) on non-overlapping windows of the training sequence length cut
from the split's token stream (documents joined with the end-of-text token); every token of a window
except the first is a target. The unigram baseline predicts the same targets from the train split's token
frequencies with add-one smoothing over the whole vocabulary. Routing frequency counts, per layer, how
often each expert is among the top-k choices of a test token.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer


LOG = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
TRAIN_SEQ_LEN = 256  # the bundled model's training window; evaluation uses the same


def load_tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents' token ids in order, each document followed by the end-of-text token."""
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
        raise ValueError(f"tokenizer has no {END_OF_TEXT!r} token")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def split_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows from the start of the stream (the tail that does not fill one is dropped)."""
    count = stream.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"stream of {stream.numel()} tokens holds no window of {seq_len}")
    return stream[: count * seq_len].view(count, seq_len)


def model_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every window's tokens after the first, and their count:
    `offline.eval_ppl.summed_nll`, the one perplexity implementation."""
    from offline.eval_ppl import EvalWindows, summed_nll

    model.eval()
    scored = EvalWindows(windows)
    return summed_nll(model, scored, batch_size=batch_size), scored.scored_tokens


def unigram_log_probs(train_stream: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probabilities of each token id from train-split frequencies, add-one smoothed."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log()


def unigram_nll(log_probs: torch.Tensor, windows: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the same targets model_nll scores (all window tokens after the first)."""
    targets = windows[:, 1:].reshape(-1)
    return -log_probs[targets].sum().item(), targets.numel()


@dataclass
class LayerRouting:
    layer: int
    frequencies: list[float]  # share of top-k assignments per expert, sums to 1
    max_over_min: float
    entropy: float  # nats
    max_entropy: float  # log(num_experts)

    @property
    def entropy_ratio(self) -> float:
        return self.entropy / self.max_entropy


@torch.no_grad()
def routing_frequencies(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> list[LayerRouting]:
    """Per layer, how often each expert is chosen (top-k of the router) over all tokens of the windows."""
    config = model.config
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    counts: list[torch.Tensor] | None = None
    model.eval()
    for start in range(0, windows.shape[0], batch_size):
        out = model(input_ids=windows[start : start + batch_size], output_router_logits=True)
        layer_logits = out.router_logits
        if counts is None:
            counts = [torch.zeros(num_experts, dtype=torch.float64) for _ in layer_logits]
        for layer, logits in enumerate(layer_logits):
            chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=num_experts).double()
    assert counts is not None
    result = []
    for layer, layer_counts in enumerate(counts):
        freq = layer_counts / layer_counts.sum()
        nonzero = freq[freq > 0]
        entropy = float(-(nonzero * nonzero.log()).sum())
        min_freq = float(freq.min())
        result.append(LayerRouting(
            layer=layer,
            frequencies=[round(float(f), 5) for f in freq],
            max_over_min=float(freq.max()) / min_freq if min_freq > 0 else math.inf,
            entropy=entropy,
            max_entropy=math.log(num_experts),
        ))
    return result


@dataclass
class SplitPerplexity:
    split: str
    targets: int
    model_ppl: float
    unigram_ppl: float

    @property
    def ratio(self) -> float:
        return self.model_ppl / self.unigram_ppl


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def _documents(sources: tuple[str, ...], split: str) -> list[str]:
    from offline.bundled.sources import read_source_documents

    return [doc for source in sources for doc in read_source_documents(source, split)]


def evaluate_split(model, tokenizer: Tokenizer, split: str, seq_len: int, unigram: torch.Tensor,
                   max_windows: int | None = None, sources: tuple[str, ...] = ("kjv",)) -> SplitPerplexity:
    windows = split_windows(token_stream(tokenizer, _documents(sources, split)), seq_len, max_windows)
    model_total, count = model_nll(model, windows)
    unigram_total, unigram_count = unigram_nll(unigram, windows)
    assert count == unigram_count
    return SplitPerplexity(split, count, math.exp(model_total / count), math.exp(unigram_total / count))


def trained_sources(model_dir: Path) -> tuple[str, ...]:
    """The text sources a bundled model was trained on (from its training record; else the KJV)."""
    from offline.bundled import BUNDLED_MODELS, training_record_path

    name = Path(model_dir).name
    if name in BUNDLED_MODELS and training_record_path(name).is_file():
        return tuple(json.loads(training_record_path(name).read_text())["options"].get("sources", ("kjv",)))
    return ("kjv",)


def evaluate(model_dir: Path, max_windows: int | None = None, seq_len: int = TRAIN_SEQ_LEN,
             sources: tuple[str, ...] | None = None) -> dict:
    """All numbers of docs/bundled-model.md: perplexities (validation, test; all trained sources pooled and
    each alone) and the test routing spread."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    sources = sources or trained_sources(model_dir)
    unigram = unigram_log_probs(token_stream(tokenizer, _documents(sources, "train")), model.config.vocab_size)
    perplexities = [evaluate_split(model, tokenizer, split, seq_len, unigram, max_windows, sources)
                    for split in ("validation", "test")]
    per_source = {source: asdict(evaluate_split(model, tokenizer, "test", seq_len, unigram, max_windows, (source,)))
                  for source in sources} if len(sources) > 1 else {}
    # each source's own windows (a prefix of the pooled stream would be the first source only)
    test_windows = torch.cat([split_windows(token_stream(tokenizer, _documents((source,), "test")), seq_len,
                                            max_windows) for source in sources])
    routing = routing_frequencies(model, test_windows)
    return {
        "seq_len": seq_len,
        "sources": list(sources),
        "perplexity": [dict(asdict(p), ratio=p.ratio) for p in perplexities],
        "test_by_source": per_source,
        "routing_test": [dict(asdict(r), entropy_ratio=r.entropy_ratio) for r in routing],
    }


def format_report(numbers: dict) -> str:
    lines = ["| split | targets | model ppl | unigram ppl | model / unigram |", "|---|---|---|---|---|"]
    for p in numbers["perplexity"]:
        lines.append(f"| {p['split']} | {p['targets']} | {p['model_ppl']:.2f} | {p['unigram_ppl']:.2f} | {p['ratio']:.3f} |")
    lines += ["", "| layer | max/min freq | entropy / log(E) | frequencies |", "|---|---|---|---|"]
    for r in numbers["routing_test"]:
        freqs = " ".join(f"{f:.3f}" for f in r["frequencies"])
        lines.append(f"| {r['layer']} | {r['max_over_min']:.2f} | {r['entropy_ratio']:.4f} | {freqs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from offline.bundled import bundled_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only this many windows per split")
    parser.add_argument("--seq-len", type=int, default=TRAIN_SEQ_LEN)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    numbers = evaluate(args.model_dir or bundled_model_dir(), args.max_windows, args.seq_len)
    if args.json is not None:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    LOG.info("results:\n%s", format_report(numbers))


if __name__ == "__main__":
    main()
