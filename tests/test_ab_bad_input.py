"""`moesvd ab` on bad input: clear errors before the start, partial results (kept and marked) after.

Arm A is always a real vLLM server; arm B is an unreachable port, a peer that answers HTTP 4xx/5xx, a
peer that dies mid-run, or a real vLLM server with another tokenizer.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from moesvd_vllm.cli import main as moesvd_main
from serve.ab import ABError, ABOptions, run_ab
from serve.launch import free_port
from serve.prompts import PromptError, prompts_from_jsonl

SMALL = dict(num_prompts=4, concurrency=(1, 2), max_tokens=4, quality_max_tokens=4, top_logprobs=3,
             repeats=3, min_round_seconds=0, show_progress=False)
ROUNDS = 3


def test_unreachable_arm_is_named_before_any_load(ab_arms, capsys):
    server_a, _ = ab_arms
    port = free_port()
    with pytest.raises(ABError) as caught:
        run_ab(ABOptions(a_url=server_a.base_url, b_url=f"127.0.0.1:{port}", **SMALL))
    message = str(caught.value)
    assert message.startswith("arm B:") and f"127.0.0.1:{port}" in message
    assert "cannot reach" in message and "check that the server is running" in message
    code = moesvd_main(["ab", "--a", server_a.base_url, "--b", f"http://127.0.0.1:{port}", "--no-progress"])
    assert code == 2
    assert "moesvd ab: arm B: cannot reach" in capsys.readouterr().err


def test_not_an_openai_server_and_unknown_model(ab_arms):
    server_a, _ = ab_arms
    with pytest.raises(ABError, match=r"arm A: .*does not serve model 'no-such-model'.*serves \["):
        run_ab(ABOptions(a_url=server_a.base_url, a_model="no-such-model", b_url=server_a.base_url, **SMALL))
    with pytest.raises(ABError, match=r"arm B: .*/v1/models answered HTTP 404.*OpenAI-compatible"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=server_a.base_url + "/nothing-here", **SMALL))
    with pytest.raises(ABError, match="not an http"):
        run_ab(ABOptions(a_url="ftp://127.0.0.1:21", b_url=server_a.base_url, **SMALL))


@pytest.mark.parametrize("status", [400, 500, 503])
def test_http_errors_keep_the_other_arm_and_mark_the_report(ab_arms, failing_peer, tmp_path, status):
    server_a, _ = ab_arms
    peer = failing_peer("http_error", status=status)
    report = run_ab(ABOptions(a_url=server_a.base_url, b_url=peer.base_url, out=tmp_path, **SMALL))
    assert not report.complete
    assert any(f"arm B concurrency=1 warmup: 1 of 1 requests failed (first: HTTP {status}" in p
               for p in report.problems)
    assert any(f"arm B concurrency=1 speed: 4 of 4 requests failed (first: HTTP {status}" in p
               for p in report.problems)
    for level in report.speed:
        assert level["A"]["completed"] == 4 * ROUNDS and level["A"]["output_throughput"] > 0  # kept
        assert level["B"]["completed"] == 0 and level["B"]["failed"] == 4 * ROUNDS
        assert all(v is None for v in level["b_over_a"].values())  # no ratio against nothing
        assert all(v is None for v in level["ratios"].values())
    assert report.quality["prompts_scored"] == 0
    assert report.quality["prompts_failed"][0]["error_b"].startswith(f"HTTP {status}")
    saved = json.loads(next(tmp_path.glob("ab-report-*.json")).read_text())
    assert saved["complete"] is False and saved["problems"] == report.problems
    assert "PARTIAL RESULTS" in next(tmp_path.glob("ab-report-*.md")).read_text()


def test_a_server_dying_mid_run_keeps_what_was_measured(ab_arms, failing_peer, tmp_path):
    server_a, _ = ab_arms
    # concurrency=1: the warm-up (1 request) and 3 rounds of 4 succeed; the peer dies at the next level's
    # warm-up
    answered = 1 + ROUNDS * 4
    peer = failing_peer("die_after", ok_answers=answered, tokens=4)
    report = run_ab(ABOptions(a_url=server_a.base_url, b_url=peer.base_url, out=tmp_path, **SMALL))
    assert not report.complete
    first, second = report.speed
    assert first["B"]["completed"] == 4 * ROUNDS and first["B"]["total_output_tokens"] == 16 * ROUNDS  # kept
    assert first["b_over_a"]["output_throughput"] is not None
    assert first["ratios"]["output_throughput"]["verdict"] is not None
    assert second["B"]["completed"] == 0 and second["B"].get("skipped", "").startswith("arm B stopped answering")
    assert second["b_over_a"]["output_throughput"] is None
    assert second["order"] == ["A"] * ROUNDS and second["A"]["completed"] == 4 * ROUNDS
    assert any("arm B stopped answering during concurrency=2" in p for p in report.problems)
    assert report.quality["prompts_scored"] == 0
    assert report.quality["prompts_failed"][0]["error_b"].startswith("skipped: arm B stopped answering")
    assert report.accounting["B"]["requests_succeeded"] == answered
    code = moesvd_main(["ab", "--a", server_a.base_url, "--b", peer.base_url, "--no-progress",
                        "--num-prompts", "2", "--concurrency", "1"])
    assert code == 2  # by now the peer is gone: nothing to start


def test_different_tokenizers_refuse_token_level_quality(ab_arms, other_tokenizer_server):
    server_a, _ = ab_arms
    report = run_ab(ABOptions(a_url=server_a.base_url, b_url=other_tokenizer_server.base_url,
                              concurrency=(2,), **{k: v for k, v in SMALL.items() if k != "concurrency"}))
    quality = report.quality
    assert quality["same_tokenization"] is False
    for key in ("mean_delta_nll", "top1_agreement", "kl_a_b_topk_lower_bound", "perplexity_ratio"):
        assert quality[key] is None, key
    assert "tokenize the prompts differently" in quality["refused"]
    assert re.search(r"first difference: prompt \d+", quality["refused"]), quality["refused"]
    assert quality["exact_match_rate"] is not None  # text-level, still meaningful
    assert not report.complete and any("refused" in p for p in report.problems)
    assert "REFUSED:" in report.to_console()
    # speed does not depend on the tokenizer and is kept
    assert report.speed[0]["A"]["completed"] == report.speed[0]["B"]["completed"] == 4 * ROUNDS


@pytest.mark.parametrize("line, expected", [
    ("not json", r"prompts.jsonl:2: not JSON"),
    ('{"prompt": "x", "max_tokens": 3}', r"prompts.jsonl:2: unknown keys \['max_tokens'\]"),
    ('{"prompt": ""}', r"prompts.jsonl:2: 'prompt' must be a non-empty string"),
    ('["a list"]', r"prompts.jsonl:2: expected a JSON object"),
])
def test_bad_prompt_files_name_the_line(tmp_path, line, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(PromptError, match=expected):
        prompts_from_jsonl(path)
    with pytest.raises(ABError, match=expected):  # before any server is contacted
        run_ab(ABOptions(a_url="127.0.0.1:9", b_url="127.0.0.1:9", prompts_path=path))


def test_bad_options_are_refused_with_the_fix(tmp_path, capsys):
    with pytest.raises(ABError, match=r"unknown A/B option\(s\) \['concurency'\]"):
        ABOptions.from_dict({"a_url": "x", "b_url": "y", "concurency": (1,)})
    with pytest.raises(ABError, match=r"repeats must be >= 3 \(alternating rounds A-B, B-A, A-B"):
        ABOptions(a_url="x", b_url="y", repeats=2)
    # the command line is generated from ABOptions: its flags, their exclusions, its checks
    with pytest.raises(SystemExit) as caught:
        moesvd_main(["ab", "--a", "x", "--b", "y", "--concurrency", "1", "--request-rate", "2"])
    assert caught.value.code == 2
    assert "not allowed with argument --concurrency" in capsys.readouterr().err
    assert moesvd_main(["ab", "--a", "x", "--b", "y", "--repeats", "1"]) == 2
    assert "moesvd ab: repeats must be >= 3" in capsys.readouterr().err
    with pytest.raises(ABError, match="concurrency levels must be integers >= 1"):
        ABOptions(a_url="x", b_url="y", concurrency=(0,))
    with pytest.raises(ABError, match="request rates must be > 0"):
        ABOptions(a_url="x", b_url="y", request_rates=(-1.0,))
    with pytest.raises(ABError, match="prompt file not found"):
        run_ab(ABOptions(a_url="x", b_url="y", prompts_path=tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------- --tasks: every check before any load

TASKS_SMALL = dict(SMALL, tasks=("kjv_cloze",), limit=4, speed=True)


def _requests_counted(server) -> float:
    from serve.http import get_text, metric_value, parse_metrics

    return metric_value(parse_metrics(get_text(server.url("/metrics"))), "vllm:request_success_total",
                        model_name=server.name)


def test_unknown_task_is_refused_before_any_request(ab_arms, capsys):
    server_a, server_b = ab_arms
    before = (_requests_counted(server_a), _requests_counted(server_b))
    with pytest.raises(ABError, match=r"unknown lm-eval task 'kjv_clozee' \(did you mean \['kjv_cloze'\]\?\); "
                                      r"local tasks: \['kjv_sentence_ending', 'kjv_cloze'\]"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=server_b.base_url, **dict(TASKS_SMALL, tasks=("kjv_clozee",))))
    with pytest.raises(ABError, match=r"task file .*missing.yaml not found"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=server_b.base_url,
                         **dict(TASKS_SMALL, tasks=("/nowhere/missing.yaml",))))
    code = moesvd_main(["ab", "--a", server_a.base_url, "--b", server_b.base_url, "--tasks", "kjv_clozee",
                        "--no-progress"])
    assert code == 2 and "moesvd ab: unknown lm-eval task 'kjv_clozee'" in capsys.readouterr().err
    assert (_requests_counted(server_a), _requests_counted(server_b)) == before


def test_lm_eval_not_installed_is_refused_before_any_request(ab_arms, monkeypatch):
    server_a, server_b = ab_arms
    before = (_requests_counted(server_a), _requests_counted(server_b))
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    with pytest.raises(ABError, match=r"--tasks needs lm-evaluation-harness .* not installed .*"
                                      r"pip install 'moesvd-vllm\[eval\]'"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=server_b.base_url, **TASKS_SMALL))
    assert (_requests_counted(server_a), _requests_counted(server_b)) == before


@pytest.mark.parametrize("status", [404, 500])
def test_an_arm_without_prompt_logprobs_is_refused_before_any_load(ab_arms, failing_peer, status):
    """The peer lists a model (so it looks OpenAI-compatible) but cannot answer completions; the
    A/B stops at its log-probability probe: arm A has seen its own probe and nothing else."""
    server_a, _ = ab_arms
    peer = failing_peer("http_error", status=status)
    before = _requests_counted(server_a)
    with pytest.raises(ABError, match=rf"arm B \(.*/v1/completions\) refused an echo \+ logprobs completion "
                                      rf"\(HTTP {status}"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=peer.base_url, b_tokenizer=str(_tokenizer_dir()),
                         **TASKS_SMALL))
    assert _requests_counted(server_a) - before == 1  # the probe
    assert peer.completions_seen == 1  # the probe


def test_an_arm_without_tokenizer_is_refused(ab_arms, failing_peer, tmp_path):
    server_a, _ = ab_arms
    peer = failing_peer("http_error", status=500)
    with pytest.raises(ABError, match=r"arm B: no tokenizer for lm-eval: .* pass --b-tokenizer DIR"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=peer.base_url, **TASKS_SMALL))
    with pytest.raises(ABError, match=r"arm B: tokenizer directory .* has none of"):
        run_ab(ABOptions(a_url=server_a.base_url, b_url=peer.base_url, b_tokenizer=str(tmp_path), **TASKS_SMALL))
    assert peer.completions_seen == 0


def _tokenizer_dir():
    from offline.bundled import bundled_model_dir

    return bundled_model_dir()
