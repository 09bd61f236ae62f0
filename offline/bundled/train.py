"""Train the bundled demo model: a small Qwen3-MoE on the KJV corpus, with its own byte-level BPE tokenizer.

    python -m offline.bundled.train --out offline/bundled/moe_mini [--record-dir offline/bundled/training]

Steps: train a byte-level BPE tokenizer on the train split; tokenize each split into one stream
(documents joined by <|endoftext|>); train Qwen3MoeForCausalLM (transformers, float32, eager attention)
with AdamW, linear warmup + cosine decay, the Switch-style load-balancing loss at a modest weight, on
random windows of the train stream drawn from a seeded generator; validate periodically on a fixed
prefix of the validation split. The model directory is written to a temporary sibling and renamed into
place; the training record (options, seed, steps, wall time, loss curve) goes to the record directory
as JSON and CSV, with a PNG plot of the curve.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from moesvd_vllm.format.directories import atomic_directory
from offline.bundled import BUNDLED_MODELS
from offline.bundled.presets import PRESETS, ModelShape, per_layer_balance_loss
from offline.bundled.sources import read_source_documents
from offline.bundled.evaluate import END_OF_TEXT, TRAIN_SEQ_LEN, model_nll, split_windows, token_stream

LOG = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainOptions:
    seed: int = 20251123
    seq_len: int = TRAIN_SEQ_LEN
    batch_size: int = 12
    steps: int = 2000
    peak_lr: float = 2e-3
    final_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.005
    balance: str = "pooled"
    sources: tuple[str, ...] = ("kjv",)
    save_dtype: str = "float32"
    experts_implementation: str = "eager"
    device: str = "cpu"
    threads: int = 1
    eval_every: int = 100
    eval_windows: int = 32
    shape: ModelShape = field(default_factory=ModelShape)


def options_from_preset(name: str, **overrides) -> TrainOptions:
    preset = PRESETS[name]
    options = TrainOptions(seed=preset.seed, steps=preset.steps, batch_size=preset.batch_size,
                           router_aux_loss_coef=preset.router_aux_loss_coef, balance=preset.balance,
                           sources=preset.sources, save_dtype=preset.save_dtype,
                           experts_implementation=preset.experts_implementation, shape=preset.shape)
    return dataclasses.replace(options, **overrides)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) with one special token, <|endoftext|> (id 0)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    return tokenizer


def build_model(shape: ModelShape, eos_id: int, aux_coef: float):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.moe_intermediate_size,  # unused: every layer is sparse
        moe_intermediate_size=shape.moe_intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.num_experts_per_tok,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        router_aux_loss_coef=aux_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation="eager",
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    return Qwen3MoeForCausalLM(config)


def learning_rate(step: int, options: TrainOptions) -> float:
    """Linear warmup to peak_lr, then cosine decay to final_lr_ratio * peak_lr at the last step."""
    if step < options.warmup_steps:
        return options.peak_lr * (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return options.peak_lr * (options.final_lr_ratio + (1.0 - options.final_lr_ratio) * cosine)


def sample_batch(stream: torch.Tensor, options: TrainOptions, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - options.seq_len, (options.batch_size,), generator=generator)
    return torch.stack([stream[s : s + options.seq_len] for s in starts.tolist()])


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (2-D and the 3-D expert banks), none on norms."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validation_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    total, count = model_nll(model, windows.to(next(model.parameters()).device))
    model.train()
    return total / count


def training_losses(out, options: TrainOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(language-model loss, balancing loss, what is minimised). "pooled": transformers already added
    coef * its pooled loss to out.loss; "per-layer": the model's coefficient is 0 and ours is added here."""
    if options.balance == "pooled":
        return out.loss - options.router_aux_loss_coef * out.aux_loss, out.aux_loss, out.loss
    if options.balance != "per-layer":
        raise ValueError(f"unknown balance {options.balance!r}; expected 'pooled' or 'per-layer'")
    aux = per_layer_balance_loss(out.router_logits, options.shape.num_experts_per_tok)
    return out.loss, aux, out.loss + options.router_aux_loss_coef * aux


def train_model(model, train_stream: torch.Tensor, val_windows: torch.Tensor, options: TrainOptions) -> list[dict]:
    """The training loop; returns the loss curve (one row per logged step)."""
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, options.weight_decay), lr=options.peak_lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    curve: list[dict] = []
    model.train()
    started = time.monotonic()
    running_loss, running_aux, running_n = 0.0, 0.0, 0
    progress = tqdm(range(options.steps), desc="train", mininterval=30)
    for step in progress:
        lr = learning_rate(step, options)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_stream, options, generator).to(options.device)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        lm_loss, aux_loss, loss = training_losses(out, options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        running_loss += lm_loss.item()
        running_aux += aux_loss.item()
        running_n += 1
        last = step + 1 == options.steps
        if (step + 1) % options.eval_every == 0 or last:
            row = {
                "step": step + 1,
                "lr": lr,
                "train_loss": running_loss / running_n,
                "aux_loss": running_aux / running_n,
                "val_loss": validation_loss(model, val_windows),
                "elapsed_s": round(time.monotonic() - started, 1),
            }
            curve.append(row)
            running_loss, running_aux, running_n = 0.0, 0.0, 0
            progress.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
            LOG.info("step %(step)d lr %(lr).2e train %(train_loss).4f aux %(aux_loss).4f val %(val_loss).4f "
                     "(%(elapsed_s).0f s)", row)
    return curve


def write_generation_config(out_dir: Path, eos_id: int) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json of our byte-level BPE tokenizers: <|endoftext|> is BOS, EOS and PAD."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_length), indent=2) + "\n")


def add_legacy_expert_count(config_path: Path) -> None:
    """transformers 5 writes only `num_local_experts`; transformers 4.x reads `num_experts` (default 128)."""
    config = json.loads(config_path.read_text())
    config.setdefault("num_experts", config["num_local_experts"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_dir(model, tokenizer: Tokenizer, out: Path, eos_id: int) -> None:
    """Save the HF directory into a partial sibling, then swap it into place."""
    with atomic_directory(out.resolve(), replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tokenizer, tmp, model.config.max_position_embeddings)
        write_generation_config(tmp, eos_id)
        add_legacy_expert_count(tmp / "config.json")


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [row["train_loss"] for row in curve], label="train (mean since last point)")
    ax.plot(steps, [row["val_loss"] for row in curve], label="validation (first windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_record(record_dir: Path, record: dict, curve: list[dict]) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    with open(record_dir / "loss_curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
    sources = ", ".join(record["options"]["sources"])
    plot_curve(curve, record_dir / "loss_curve.png", f"bundled MoE ({sources}) training loss")


def run(out: Path, record_dir: Path, options: TrainOptions) -> dict:
    torch.set_num_threads(options.threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(options.seed)
    started = time.monotonic()

    train_docs = [doc for name in options.sources for doc in read_source_documents(name, "train")]
    tokenizer = train_tokenizer(train_docs, options.shape.vocab_size)
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    train_stream = token_stream(tokenizer, train_docs)
    per_source = max(1, options.eval_windows // len(options.sources))
    val_windows = torch.cat([split_windows(token_stream(tokenizer, read_source_documents(name, "validation")),
                                           options.seq_len, per_source) for name in options.sources])
    LOG.info("tokenizer: %d tokens; train stream %d tokens (%.2f bytes/token)", tokenizer.get_vocab_size(),
             train_stream.numel(), sum(len(d.encode()) for d in train_docs) / train_stream.numel())

    pooled_coef = options.router_aux_loss_coef if options.balance == "pooled" else 0.0
    model = build_model(options.shape, eos_id, pooled_coef).to(options.device)
    if options.experts_implementation != "eager":
        model.set_experts_implementation(options.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %d parameters (%s)", n_params, options.shape)

    curve = train_model(model, train_stream, val_windows, options)
    model.eval()
    if options.experts_implementation != "eager":
        model.set_experts_implementation("eager")
    write_model_dir(model.to("cpu", getattr(torch, options.save_dtype)), tokenizer, out, eos_id)
    wall = time.monotonic() - started
    record = {
        "options": dataclasses.asdict(options),
        "parameters": n_params,
        "train_tokens": train_stream.numel(),
        "tokens_seen": options.steps * options.batch_size * options.seq_len,
        "final": curve[-1],
        "wall_time_s": round(wall, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "loss_curve": curve,
    }
    write_record(record_dir, record, curve)
    LOG.info("done in %.0f s: %s", wall, curve[-1])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="moe_mini",
                        help="model shape and recipe (offline/bundled/presets.py); the defaults are the committed run")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--record-dir", type=Path, default=None,
                        help="where the training record goes (default: <out>/../training for moe_mini, "
                        "<out>/../training_fine for moe_fine)")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N]: train a larger model on a GPU")
    parser.add_argument("--hidden-size", type=int, default=None, help="scale the preset up (with --device cuda)")
    parser.add_argument("--layers", type=int, default=None, help="scale the preset up")
    parser.add_argument("--experts", type=int, default=None, help="scale the preset up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    preset = PRESETS[args.preset]
    shape = dataclasses.replace(preset.shape, **{
        key: value for key, value in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                                      ("num_experts", args.experts)) if value is not None})
    overrides = {key: value for key, value in (("steps", args.steps), ("batch_size", args.batch_size),
                                               ("seed", args.seed)) if value is not None}
    options = options_from_preset(args.preset, threads=args.threads, eval_every=args.eval_every,
                                  device=args.device, shape=shape, **overrides)
    record_dir = args.record_dir or args.out.resolve().parent / BUNDLED_MODELS.get(args.preset, "training")
    run(args.out, record_dir, options)


if __name__ == "__main__":
    main()
