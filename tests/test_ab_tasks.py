"""`moesvd ab --tasks`: real lm-evaluation-harness runs on both arms through their OpenAI endpoints.

The local tasks (serve/lm_tasks/, built from the bundled corpus's test split) run on real vLLM servers:
the bundled model dense against compressed at 60 % (recovery below 100 %, reproducible to the digit
with the same seed), and against its exact full-rank compressed twin (recovery 100 % within the
bootstrap interval). A task given as a YAML file runs too.
"""

from __future__ import annotations

import json
import math

import pytest

from moesvd_vllm.cli import main as moesvd_main
from serve.ab import ABOptions, run_ab
from serve.ab_tasks import NO_DIFFERENCE, NUMERICAL_RESOLUTION
from serve.lm_tasks import LOCAL_TASKS, TASKS_DIR
from serve.lm_tasks.build import build, main as build_main

LIMIT = 80
NO_LOAD = dict(speed=False, quality=False, show_progress=False)
EXPECTED_METRICS = {("kjv_sentence_ending", "acc"), ("kjv_sentence_ending", "acc_norm"), ("kjv_cloze", "acc"),
                    ("kjv_cloze", "perplexity")}


def rows_by_metric(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["task"], row["metric"]): row for row in rows}


def test_local_task_data_are_the_builders_output_from_the_test_split():
    assert build_main(["--check"]) == 0
    from offline.bundled import read_split

    test_text, train_text = read_split("test"), read_split("train")
    for name, content in build().items():
        assert json.loads((TASKS_DIR / name).read_text()) == content
        for doc in content["docs"][:50]:
            assert doc["context"].split(". ")[0] in test_text  # held-out text
            assert doc["context"] not in train_text
    docs = build()["kjv_sentence_ending.json"]["docs"]
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert len({d["label"] for d in docs}) == 4  # the answer is not always in one place
    cloze = build()["kjv_cloze.json"]["docs"]
    assert all(d["target"].startswith(" ") and d["target"][1:].isalpha() for d in cloze)


@pytest.fixture(scope="module")
def bundled_task_reports(bundled_arms, tmp_path_factory):
    """The local tasks on the bundled model (dense A, compressed B) twice: the Python API, then the CLI."""
    dense, compressed = bundled_arms
    first = run_ab(ABOptions(a_url=dense.base_url, b_url=compressed.base_url, tasks=LOCAL_TASKS, limit=LIMIT,
                             **NO_LOAD))
    out = tmp_path_factory.mktemp("tasks-cli")
    code = moesvd_main(["ab", "--a", dense.base_url, "--b", compressed.base_url, "--tasks", ",".join(LOCAL_TASKS),
                        "--limit", str(LIMIT), "--no-speed", "--no-quality", "--no-progress", "--out", str(out)])
    assert code == 0
    second = json.loads(next(out.glob("ab-report-*.json")).read_text())
    markdown = next(out.glob("ab-report-*.md")).read_text()
    return first, second, markdown


def test_compressed_bundled_model_task_recovery(bundled_task_reports):
    report, _, markdown = bundled_task_reports
    assert report.complete, report.problems
    tasks = report.tasks
    assert tasks["settings"]["limit"] == LIMIT and tasks["lm_eval_version"]
    assert tasks["documents"] == {name: LIMIT for name in LOCAL_TASKS}
    rows = rows_by_metric(tasks["rows"])
    assert set(rows) == EXPECTED_METRICS
    for key, row in rows.items():
        assert row["documents"] == LIMIT, key
        assert row["recovery"] == pytest.approx(row["b"] / row["a"]) and row["difference"] == pytest.approx(
            row["b"] - row["a"])
        low, high = row["difference_interval"]
        assert low <= row["difference"] <= high, key  # the interval holds the full-sample difference
        r_low, r_high = row["recovery_interval"]
        assert r_low <= row["recovery"] <= r_high, key
        assert row["verdict"] in ("B better", "B worse", NO_DIFFERENCE)
        numerical = max(abs(low), abs(high)) <= NUMERICAL_RESOLUTION * abs(row["a"])
        assert (row["verdict"] == NO_DIFFERENCE) == (low <= 0 <= high or numerical), key
    for metric in ("acc", "acc_norm"):
        assert 0 <= rows[("kjv_sentence_ending", metric)]["a"] <= 1
    # a trained model against chance (1/4 for four choices) and a compressed one that lost some of it
    assert rows[("kjv_sentence_ending", "acc")]["a"] > 0.25
    assert rows[("kjv_cloze", "perplexity")]["b"] > rows[("kjv_cloze", "perplexity")]["a"] > 1
    assert rows[("kjv_cloze", "perplexity")]["higher_is_better"] is False
    for needle in ("Tasks (lm-evaluation-harness)", "| kjv_cloze | perplexity (lower is better) |", "recovery"):
        assert needle in markdown or needle in report.to_console()
    assert "kjv_cloze acc recovery" in report.headline()


def test_same_seed_same_scores(bundled_task_reports):
    first, second, _ = bundled_task_reports
    again = rows_by_metric(second["tasks"]["rows"])
    for key, row in rows_by_metric(first.tasks["rows"]).items():
        for field in ("a", "b", "recovery", "difference_interval", "recovery_interval", "documents"):
            assert again[key][field] == row[field], (key, field)


def test_dense_against_its_exact_twin_recovers_everything(vllm_server, bundled_twin_server):
    from offline.bundled import bundled_model_dir

    dense = vllm_server(bundled_model_dir())  # the session's dense bundled server (also arm A of bundled_arms)
    report = run_ab(ABOptions(a_url=dense.base_url, b_url=bundled_twin_server.base_url, tasks=LOCAL_TASKS,
                              limit=LIMIT, **NO_LOAD))
    assert report.complete, report.problems
    rows = rows_by_metric(report.tasks["rows"])
    assert set(rows) == EXPECTED_METRICS
    for key, row in rows.items():
        assert row["a"] > 0, key  # the trained model scores: its recovery is defined
        low, high = row["recovery_interval"]
        # 100 % within the interval, up to the numerical resolution: the twin's log-probabilities equal the
        # dense ones to float32 rounding (sums of a few hundred terms in another order, ~1e-6 relative),
        # a systematic offset that resampling documents cannot wash out
        assert low - NUMERICAL_RESOLUTION <= 1.0 <= high + NUMERICAL_RESOLUTION, (key, low, high)
        assert row["verdict"] == NO_DIFFERENCE, key
    ppl = rows[("kjv_cloze", "perplexity")]
    assert math.isclose(ppl["recovery"], 1.0, rel_tol=NUMERICAL_RESOLUTION)


def test_a_task_from_a_yaml_file(ab_arms, tmp_path):
    """Any lm-eval YAML works: here one reading a JSONL file through `datasets` (no custom loader)."""
    dense, _ = ab_arms
    data = tmp_path / "verses.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "word": w}) for t, w in [
        ("In the beginning God created the heaven and the", " earth"),
        ("And God said, Let there be", " light"),
        ("And the evening and the morning were the first", " day"),
        ("And God called the light Day, and the darkness he called", " Night")]) + "\n")
    yaml = tmp_path / "my_verses.yaml"
    yaml.write_text(f"""task: my_verses
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{word}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    report = run_ab(ABOptions(a_url=dense.base_url, b_url=dense.base_url, tasks=(str(yaml),), **NO_LOAD))
    assert report.complete, report.problems
    assert report.tasks["tasks_resolved"] == [str(yaml)]
    (row,) = report.tasks["rows"]
    assert (row["task"], row["metric"], row["documents"]) == ("my_verses", "acc", 4)
    assert row["a"] == row["b"] and row["difference_interval"] == [0.0, 0.0]
