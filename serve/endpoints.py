"""What an OpenAI-compatible endpoint says about itself: base URL, served model, server version.

Works against any server that speaks the OpenAI HTTP API (`GET /v1/models`); vLLM's extras (`/version`,
`/metrics`) are used when present and recorded as missing otherwise.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
from dataclasses import dataclass

from serve.http import HTTPError, get_text

logger = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """An endpoint cannot be used; the message names the URL, the problem and what to do."""


def normalize_base_url(url: str) -> str:
    """'http://h:p', 'http://h:p/', 'http://h:p/v1' and 'h:p' all become 'http://h:p'."""
    text = url.strip()
    if not text:
        raise EndpointError("empty server URL; pass e.g. --a http://127.0.0.1:8000")
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EndpointError(f"not an http(s) server URL: {url!r}; pass e.g. http://127.0.0.1:8000")
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def _get_json(url: str, timeout: float) -> dict:
    return json.loads(get_text(url, timeout=timeout))


def describe_unreachable(url: str, err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    return (f"cannot reach {url} ({reason}); check that the server is running and the URL "
            f"(scheme, host, port) is right")


def model_entries(base_url: str, timeout: float = 10.0) -> list[dict]:
    """The model objects of GET /v1/models (vLLM adds `root`, the model directory, and `max_model_len`)."""
    url = base_url + "/v1/models"
    try:
        answer = _get_json(url, timeout)
    except HTTPError as err:
        raise EndpointError(f"{url} answered HTTP {err.status} ({err.body[:200]!r}); is this an "
                            "OpenAI-compatible server?") from None
    except (urllib.error.URLError, OSError) as err:
        raise EndpointError(describe_unreachable(url, err)) from None
    except json.JSONDecodeError:
        raise EndpointError(f"{url} did not answer JSON; is this an OpenAI-compatible server?") from None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise EndpointError(f"{url} answered without a 'data' list of models: {str(answer)[:200]}")
    return [item for item in data if isinstance(item, dict) and item.get("id")]


def list_models(base_url: str, timeout: float = 10.0) -> list[str]:
    """Model ids served at base_url, from GET /v1/models."""
    return [str(item["id"]) for item in model_entries(base_url, timeout)]


def discover_model(base_url: str, requested: str | None = None, timeout: float = 10.0) -> str:
    """The model to send requests to: `requested` if the server lists it, else the only one listed."""
    models = list_models(base_url, timeout)
    if requested:
        if models and requested not in models:
            raise EndpointError(f"{base_url} does not serve model {requested!r}; it serves {models}. "
                                "Pass one of those (or omit the model name to use the only one).")
        return requested
    if len(models) == 1:
        return models[0]
    if not models:
        raise EndpointError(f"{base_url}/v1/models lists no model; pass the model name explicitly")
    raise EndpointError(f"{base_url} serves several models {models}; pass the one to compare explicitly")


def server_version(base_url: str, timeout: float = 5.0) -> str | None:
    """vLLM's /version answer ("0.32.0"), or None where the server has no such endpoint."""
    try:
        answer = _get_json(base_url + "/version", timeout)
    except (HTTPError, urllib.error.URLError, OSError, json.JSONDecodeError, ValueError):
        return None
    return str(answer.get("version")) if isinstance(answer, dict) and answer.get("version") else None


@dataclass(frozen=True)
class Endpoint:
    """One arm of an A/B: where it is and what it serves."""

    label: str  # "A" or "B"
    base_url: str
    model: str
    version: str | None = None
    root: str | None = None  # vLLM: the model directory (or Hub name) the server loaded
    max_model_len: int | None = None  # vLLM: the context length the server accepts

    def url(self, path: str) -> str:
        return self.base_url + path


def resolve_endpoint(label: str, url: str, model: str | None = None) -> Endpoint:
    base_url = normalize_base_url(url)
    resolved_model = discover_model(base_url, model)
    version = server_version(base_url)
    logger.info("arm %s: %s serves %r (server version %s)", label, base_url, resolved_model,
                version or "unknown")
    entry = next((e for e in model_entries(base_url) if str(e["id"]) == resolved_model), {})
    max_len = entry.get("max_model_len")
    return Endpoint(label=label, base_url=base_url, model=resolved_model, version=version,
                    root=str(entry["root"]) if entry.get("root") else None,
                    max_model_len=int(max_len) if isinstance(max_len, int) and max_len > 0 else None)
