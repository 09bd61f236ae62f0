"""`moesvd ab --tasks`: lm-evaluation-harness task scores of both arms, and B's recovery of A's scores.

Each arm is evaluated by lm-eval's own `local-completions` model (its OpenAI-compatible completions
client: loglikelihoods from `echo` + `logprobs`, generations from ordinary completions) with the same
settings: tasks, few-shot count, seeds, document limit, batch size. Per task and metric the report gives
A, B, recovery B/A and a 95 % paired bootstrap interval of the difference B - A (and of B/A): the same
documents are resampled for both arms `bootstrap_resamples` times and the task's own aggregation
(mean, perplexity, ...) is applied to each resample. The verdict is "B better" / "B worse" when the
difference's interval excludes 0 by more than the numerical resolution (NUMERICAL_RESOLUTION x |A|),
else "no difference within the noise".

Every check runs before the first request of the A/B (`prepare_task_run`): lm-eval importable, each task
a registered name (built-in, or local: serve/lm_tasks/) or a YAML file, its data loadable, a tokenizer per
arm (the model directory named by vLLM's /v1/models `root`, the server's /tokenize, or --a-tokenizer), and
when a task scores log-likelihoods, one probe request that the arm returns prompt log-probabilities.
"""

from __future__ import annotations

import difflib
import logging
import time
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moesvd_vllm.errors import MoESVDError
from serve.endpoints import Endpoint
from serve.http import HTTPError, get_text, post_json
from serve.lm_tasks import LOCAL_TASKS, TASKS_DIR

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'moesvd-vllm[eval]' (or `pip install 'lm-eval[api]>=0.4.13'`)"
LOGLIKELIHOOD_TYPES = {"loglikelihood", "loglikelihood_rolling", "multiple_choice"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
INTERVAL = (2.5, 97.5)
B_BETTER, B_WORSE, NO_DIFFERENCE = "B better", "B worse", "no difference within the noise"
# Differences below this fraction of A are numerical, not a change of the model: two servers computing the
# same function in float32 differ by about 1e-6 relative (their kernels sum in other orders; an exact
# full-rank twin of the bundled model: 2.6e-7 in cloze perplexity), bf16 serving by about 1e-2, which
# stays visible. The bootstrap cannot see such a systematic offset as noise, so the verdict ignores it.
NUMERICAL_RESOLUTION = 1e-4


class TaskError(MoESVDError):
    """The task evaluation cannot start; the message names the problem and the fix."""


@dataclass(frozen=True)
class TaskSettings:
    """The lm-eval settings, the same for both arms."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    seed: int = 1234
    num_concurrent: int = 1
    bootstrap_resamples: int = 1000
    request_timeout_s: float = 600.0


def require_lm_eval():
    """The lm_eval module with its API client importable, or a TaskError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models import openai_completions  # noqa: F401 (needs the `api` extra: tenacity)
    except ImportError as err:
        raise TaskError(f"--tasks needs lm-evaluation-harness with its API client, which is not installed "
                        f"({err}); install it with {INSTALL_HINT}") from None
    return lm_eval


class _CustomDatasetNotice(logging.Filter):
    """lm-eval warns about metadata kwargs for every task with a `custom_dataset` (ours): not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _task_manager(names: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_CustomDatasetNotice())
    only_local = all(name in LOCAL_TASKS for name in names)
    # Indexing lm-eval's ~15k built-in task configs takes seconds: skip it when only local tasks are asked.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not only_local)


def resolve_task_names(manager, names: tuple[str, ...]) -> list[str]:
    """Each name as lm-eval will load it (a registered name, or the absolute path of a YAML file)."""
    specs = []
    for name in names:
        path = Path(name).expanduser()
        if name in manager.all_tasks:
            specs.append(name)
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            specs.append(str(path.resolve()))
        elif path.suffix in (".yaml", ".yml"):
            raise TaskError(f"task file {name} not found")
        else:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise TaskError(f"unknown lm-eval task {name!r}" + (f" (did you mean {close}?)" if close else "")
                            + f"; local tasks: {list(LOCAL_TASKS)}; lm-eval lists the others with "
                            "`lm_eval ls tasks`; a task YAML file can be given by its path")
    return specs


def load_task_objects(manager, specs: list[str]) -> dict:
    """{task name: lm-eval Task}: loads each task's data now, so a missing dataset fails before any load."""
    tasks = {}
    for spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as err:  # noqa: BLE001 (datasets, YAML and network errors all mean "cannot load")
            raise TaskError(f"task {spec}: cannot load it or its data ({type(err).__name__}: {err}); tasks "
                            "from the Hub need network access or a local datasets cache") from None
        tasks.update(loaded["tasks"])
    return tasks


def _is_tokenizer_dir(path: str | None) -> bool:
    return bool(path) and Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _remote_tokenizer(endpoint: Endpoint) -> bool:
    """The server has lm-eval's remote tokenizer endpoints (/tokenizer_info and /tokenize)."""
    try:
        get_text(endpoint.url("/tokenizer_info"), timeout=5.0)
    except (HTTPError, urllib.error.URLError, OSError):
        return False
    return True


def tokenizer_args(endpoint: Endpoint, override: str | None) -> dict:
    """The tokenizer part of lm-eval's model_args for one arm (nothing is downloaded)."""
    if override is not None:
        if not _is_tokenizer_dir(override):
            raise TaskError(f"arm {endpoint.label}: tokenizer directory {override} has none of {TOKENIZER_FILES}")
        return {"tokenizer": str(Path(override).resolve()), "tokenizer_backend": "huggingface"}
    if _is_tokenizer_dir(endpoint.root):
        return {"tokenizer": endpoint.root, "tokenizer_backend": "huggingface"}
    if _remote_tokenizer(endpoint):
        return {"tokenizer_backend": "remote"}
    raise TaskError(f"arm {endpoint.label}: no tokenizer for lm-eval: the server's model root "
                    f"{endpoint.root!r} is not a local tokenizer directory and {endpoint.base_url} has no "
                    f"/tokenizer_info; pass --{endpoint.label.lower()}-tokenizer DIR")


def probe_prompt_logprobs(endpoint: Endpoint, timeout: float) -> None:
    """One echo + logprobs request: log-likelihood tasks need the prompt tokens' log-probabilities."""
    payload = {"model": endpoint.model, "prompt": "And God said, Let there be light", "max_tokens": 1,
               "echo": True, "logprobs": 1, "temperature": 0.0}
    where = f"arm {endpoint.label} ({endpoint.url('/v1/completions')})"
    try:
        answer = post_json(endpoint.url("/v1/completions"), payload, timeout=timeout)
    except HTTPError as err:
        raise TaskError(f"{where} refused an echo + logprobs completion (HTTP {err.status}: {err.body[:200]}); "
                        "log-likelihood tasks need an OpenAI completions endpoint that returns prompt "
                        "log-probabilities (vLLM does)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise TaskError(f"{where} did not answer the log-probability probe with JSON ({err})") from None
    try:
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
        usable = isinstance(values, list) and len(values) >= 2 and all(
            isinstance(v, (int, float)) for v in values[1:])
    except (KeyError, IndexError, TypeError):
        usable = False
    if not usable:
        raise TaskError(f"{where} answered an echo + logprobs completion without prompt log-probabilities "
                        f"({str(answer)[:200]}); it is not OpenAI-compatible enough for log-likelihood tasks")


def paired_bootstrap(a_items: list, b_items: list, aggregate, resamples: int, seed: int) -> dict:
    """95 % intervals of aggregate(B) - aggregate(A) and of their ratio, documents resampled jointly."""
    rng = np.random.default_rng(seed)
    n = len(a_items)
    differences, ratios = [], []
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        a = aggregate([a_items[i] for i in index])
        b = aggregate([b_items[i] for i in index])
        differences.append(b - a)
        if a:
            ratios.append(b / a)
    low, high = np.percentile(differences, INTERVAL)
    out = {"difference_interval": [float(low), float(high)], "recovery_interval": None}
    if ratios:
        out["recovery_interval"] = [float(x) for x in np.percentile(ratios, INTERVAL)]
    return out


def _verdict(interval: list[float] | None, higher_is_better: bool | None, a: float) -> str | None:
    if interval is None or higher_is_better is None:
        return None
    low, high = interval
    if max(abs(low), abs(high)) <= NUMERICAL_RESOLUTION * abs(a):
        return NO_DIFFERENCE
    if low > 0:
        return B_BETTER if higher_is_better else B_WORSE
    if high < 0:
        return B_WORSE if higher_is_better else B_BETTER
    return NO_DIFFERENCE


def _items_by_doc(samples: list[dict], metric: str, filter_name: str) -> dict:
    return {s["doc_id"]: s[metric] for s in samples if s.get("filter") == filter_name and metric in s}


def compare_results(results: dict[str, dict], tasks: dict, resamples: int, seed: int) -> list[dict]:
    """One row per task, metric and filter: A, B, recovery B/A, bootstrap intervals, verdict."""
    rows = []
    a_res, b_res = results["A"], results["B"]
    for task_name, a_values in a_res["results"].items():
        b_values = b_res["results"].get(task_name, {})
        task = tasks.get(task_name)
        aggregations = task.aggregation() if task is not None else {}
        directions = task.higher_is_better() if task is not None else {}
        for key, a_value in a_values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(a_value, (int, float)):
                continue
            b_value = b_values.get(key)
            row = {"task": task_name, "metric": metric, "filter": filter_name, "a": float(a_value),
                   "b": None if b_value is None else float(b_value), "higher_is_better": directions.get(metric),
                   "recovery": None, "difference": None, "difference_interval": None,
                   "recovery_interval": None, "verdict": None, "documents": None}
            if row["b"] is not None:
                row["difference"] = row["b"] - row["a"]
                row["recovery"] = row["b"] / row["a"] if row["a"] else None
            a_items = _items_by_doc(a_res.get("samples", {}).get(task_name, []), metric, filter_name)
            b_items = _items_by_doc(b_res.get("samples", {}).get(task_name, []), metric, filter_name)
            if a_items and a_items.keys() == b_items.keys() and metric in aggregations:
                docs = sorted(a_items)
                row["documents"] = len(docs)
                row.update(paired_bootstrap([a_items[d] for d in docs], [b_items[d] for d in docs],
                                            aggregations[metric], resamples, seed))
                row["verdict"] = _verdict(row["difference_interval"], row["higher_is_better"], row["a"])
            rows.append(row)
    return rows


class TaskRun:
    """A prepared evaluation of both arms (every check done); `run` evaluates A, then B."""

    def __init__(self, settings: TaskSettings, arms: dict[str, Endpoint], model_args: dict[str, dict],
                 manager, specs: list[str], tasks: dict):
        self.settings, self.arms, self.model_args = settings, arms, model_args
        self.manager, self.specs, self.tasks = manager, specs, tasks

    def _evaluate(self, label: str) -> dict:
        import lm_eval

        s = self.settings
        seeds = {"random_seed": s.seed, "numpy_random_seed": s.seed, "torch_random_seed": s.seed,
                 "fewshot_random_seed": s.seed}
        return lm_eval.simple_evaluate(
            model="local-completions", model_args=self.model_args[label], tasks=list(self.specs),
            num_fewshot=s.num_fewshot, batch_size=s.batch_size, limit=s.limit, log_samples=True,
            bootstrap_iters=0, task_manager=self.manager, **seeds)

    def run(self, down: dict[str, str], problems: list[str], show_progress: bool = True) -> dict:
        """The report's `tasks` section; failures are recorded in `problems`, never raised."""
        results, seconds = {}, {}
        for label in ("A", "B"):
            if label in down:
                problems.append(f"tasks: arm {label} skipped ({down[label]})")
                continue
            started = time.monotonic()
            try:
                results[label] = self._evaluate(label)
            except Exception as err:  # noqa: BLE001 (lm-eval raises many kinds; the report keeps the rest)
                problems.append(f"tasks: lm-eval on arm {label} failed ({type(err).__name__}: {str(err)[:300]})")
                logger.exception("lm-eval on arm %s failed", label)
            seconds[label] = time.monotonic() - started
        section = {"settings": asdict(self.settings), "lm_eval_version": _lm_eval_version(),
                   "tasks_resolved": self.specs, "seconds": seconds,
                   "model_args": {k: {a: v for a, v in args.items()} for k, args in self.model_args.items()},
                   "n_shot": {}, "rows": []}
        if len(results) == 2:
            section["rows"] = compare_results(results, self.tasks, self.settings.bootstrap_resamples,
                                              self.settings.seed)
            section["n_shot"] = results["A"].get("n-shot", {})
            section["documents"] = {task: results["A"].get("n-samples", {}).get(task, {}).get("effective")
                                    for task in results["A"].get("n-samples", {})}
        return section


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def prepare_task_run(settings: TaskSettings, arms: dict[str, Endpoint],
                     tokenizers: dict[str, str | None]) -> TaskRun:
    """Every check before the first request; raises TaskError naming the problem and the fix."""
    require_lm_eval()
    manager = _task_manager(settings.tasks)
    specs = resolve_task_names(manager, settings.tasks)
    tasks = load_task_objects(manager, specs)
    needs_logprobs = any(task.OUTPUT_TYPE in LOGLIKELIHOOD_TYPES for task in tasks.values())
    model_args = {}
    for label, endpoint in arms.items():
        model_args[label] = {"model": endpoint.model, "base_url": endpoint.url("/v1/completions"),
                             "max_length": endpoint.max_model_len or 2048, "num_concurrent": settings.num_concurrent,
                             "timeout": int(settings.request_timeout_s), "max_retries": 2, "seed": settings.seed,
                             **tokenizer_args(endpoint, tokenizers.get(label))}
    if needs_logprobs:  # the only completion requests before the A/B starts: one per arm
        for endpoint in arms.values():
            probe_prompt_logprobs(endpoint, timeout=min(settings.request_timeout_s, 120.0))
    return TaskRun(settings, arms, model_args, manager, specs, tasks)
