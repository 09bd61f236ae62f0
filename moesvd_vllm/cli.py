"""`moesvd` console script: one dispatcher, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand runs, so `moesvd --help` stays fast and no subcommand pays for another's imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("serve.demo", "compress the bundled model, serve it with vLLM, A/B it, show tokens/s"),
    "compress": ("offline.cli_compress", "compress a Hugging Face MoE checkpoint with MoE-SVD"),
    "prune-experts": ("offline.cli_prune_experts",
                      "remove the least salient experts (REAP or frequency): a checkpoint stock vLLM serves"),
    "skip": ("offline.cli_skip", "add dynamic expert skipping (beta per MoE layer) to a dense checkpoint"),
    "recover": ("offline.recover", "distil a compressed checkpoint toward its dense original (same format)"),
    "eval-ppl": ("offline.eval_ppl", "held-out perplexity of dense/compressed checkpoints (PyTorch)"),
    "serve": ("serve.cli_serve", "start vLLM's OpenAI server for a dense or compressed checkpoint"),
    "ab": ("serve.ab", "A/B compare two OpenAI-compatible servers (speed and quality)"),
    "monitor": ("serve.monitor", "live tokens/s per model_name from /metrics or Prometheus"),
    "build-fixtures": ("offline.fixtures.tiny", "write tiny random checkpoints of each architecture"),
    "build-bench-model": ("offline.fixtures.bench_shapes",
                          "write a random model with Qwen3-30B-A3B or Mixtral-8x7B layer shapes"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: moesvd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`moesvd <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"moesvd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"moesvd {name}", description=help_)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
