"""Quality of dynamic expert skipping against beta on a checkpoint (PyTorch reference, float32):

    PYTHONPATH=. .venv/bin/python -m offline.skip_quality offline/bundled/moe_mini \
        --data offline/bundled/kjv_text/test.txt --betas 0,0.1,0.2,0.3,0.5,0.7,1 --json OUT.json

For each beta (the same for every MoE layer, through load_reference_model's `skip_beta`; `stored` is the
checkpoint's own per-layer betas, as `moesvd skip --skip-target` calibrated them): the share of
non-top-1 (token, expert) pairs skipped on the text, perplexity, the mean KL(no skipping || skipping) of
the next-token distributions and the top-1 agreement with the model without skipping. Windows as
`moesvd eval-ppl` cuts them (the first token of a window is context only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from offline.eval_ppl import load_tokenizer, make_windows
from offline.reference import load_reference_model
from offline.skipping import SkippingExperts

log = logging.getLogger(__name__)

@torch.no_grad()
def _logprobs(model, windows, batch_size: int = 8) -> torch.Tensor:
    outs = [model(windows.input_ids[i:i + batch_size]).logits[:, :-1].float().log_softmax(-1)
            for i in range(0, windows.input_ids.shape[0], batch_size)]
    return torch.cat(outs)


def _skip_beta_argument(beta: float | str) -> str | None:
    """load_reference_model's `skip_beta` for one row: None keeps the checkpoint's stored betas."""
    if beta == "stored":
        return None
    return str(beta) if beta > 0 else "off"


def evaluate(model_dir: str, text: str, betas: list[float | str], seq_len: int = 128, max_tokens: int | None = 16384
             ) -> list[dict]:
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = make_windows(ids, seq_len=seq_len, max_tokens=max_tokens, bos_token_id=None)
    targets = windows.input_ids[:, 1:]
    base = _logprobs(load_reference_model(model_dir, skip_beta="off"), windows)
    top_k = None
    rows = []
    for beta in betas:
        model = load_reference_model(model_dir, skip_beta=_skip_beta_argument(beta))
        logprobs = _logprobs(model, windows)
        wrappers = [m for m in model.modules() if isinstance(m, SkippingExperts)]
        routed = sum(w.routed_pairs for w in wrappers)
        skipped = sum(w.skipped_pairs for w in wrappers)
        if top_k is None:
            top_k = model.config.num_experts_per_tok
        non_top1 = routed * (top_k - 1) / top_k
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).mean().item()
        kl = (base.exp() * (base - logprobs)).sum(-1).mean().item()
        agree = (base.argmax(-1) == logprobs.argmax(-1)).double().mean().item()
        rows.append({"beta": beta, "skip_fraction": skipped / non_top1 if non_top1 else 0.0, "ppl": math.exp(nll),
                     "kl": kl, "top1_agreement": agree, "tokens": int(targets.numel())})
        log.info("beta %s: skip %.3f  ppl %.3f  KL %.5f  top-1 %.4f", beta, rows[-1]["skip_fraction"],
                 rows[-1]["ppl"], kl, agree)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data", required=True)
    parser.add_argument("--betas", default="0,0.1,0.2,0.3,0.4,0.5,0.7,1",
                        help="comma-separated betas in [0, 1]; `stored` = the checkpoint's per-layer betas")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    betas = [b if b == "stored" else float(b) for b in args.betas.split(",")]
    rows = evaluate(args.model_dir, Path(args.data).read_text(encoding="utf-8"), betas, args.seq_len,
                    args.max_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
