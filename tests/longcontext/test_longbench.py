"""`toroidal longbench` and `scrolls`: task names, generated tasks, --both, --compare, offline errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from helpers import assert_one_line_error

from toroidal.longcontext.synthetic import needle_docs, passkey_docs  # noqa: E402
from toroidal.longcontext.tasks import (  # noqa: E402
    LONGBENCH,
    SCROLLS,
    SHIPPED_LENGTHS,
    SYNTHETIC,
    resolve_tasks,
    shipped_variant_tags,
    variant_name,
    variant_yaml,
    write_variants,
)
from toroidal.training import SetupError, TrainConfig, train  # noqa: E402
from toroidal.training.tokenization import ByteTokenizer  # noqa: E402
from toroidal_cli.app import app  # noqa: E402
from toroidal_cli.results import read_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    """lm-eval asks git for a commit hash in the working directory: not this checkout's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "toroidal"
    micro = dict(model="micro", seq_len=16, batch_size=4, eval_batches=1, warmup_steps=1, eval_every=0)
    train(TrainConfig(**micro, steps=3), folder)
    return folder


# --- task names --------------------------------------------------------------------------------------------


def _lm_eval_task_names(folder: str) -> set[str]:
    import lm_eval

    names = set()
    for path in (Path(lm_eval.__path__[0]) / "tasks" / folder).glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        names.update(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("task:"))
    return names


@pytest.mark.parametrize("suite", [LONGBENCH, SCROLLS])
def test_every_short_name_is_a_task_of_the_installed_lm_eval(suite):
    available = _lm_eval_task_names(suite.name)
    missing = [suite.prefix + name for name in suite.tasks if suite.prefix + name not in available]
    assert not missing


def test_names_map_to_lm_eval_tasks():
    default = [r.name for r in resolve_tasks(LONGBENCH, None)]
    assert default[:2] == ["longbench_narrativeqa", "longbench_qasper"] and len(default) == 16
    assert "longbench_dureader" not in default  # the default is the English subset
    names = ["narrativeqa", "qasper_e", "longbench_single", "passkey", "toroidal_needle_2048", "mine"]
    requests = resolve_tasks(LONGBENCH, names, lengths=[256, 512])
    assert [r.name for r in requests] == [
        "longbench_narrativeqa",
        "longbench_qasper_e",
        "longbench_single",
        "toroidal_passkey_256",
        "toroidal_passkey_512",
        "toroidal_needle_2048",
        "mine",
    ]
    assert (requests[3].kind, requests[3].length) == ("passkey", 256)
    assert [r.name for r in resolve_tasks(SCROLLS, ["quality"])] == ["scrolls_quality"]
    assert len(resolve_tasks(SCROLLS, None)) == 7
    assert [r.length for r in resolve_tasks(LONGBENCH, ["needle_multikey"])] == list(SHIPPED_LENGTHS)
    with pytest.raises(SetupError, match="--lengths applies to the synthetic tasks"):
        resolve_tasks(LONGBENCH, ["narrativeqa"], lengths=[1024])


def test_shipped_variants_are_what_the_runner_writes():
    folder = ROOT / "configs" / "tasks" / "toroidal"
    for kind in SYNTHETIC:
        for length in SHIPPED_LENGTHS:
            path = folder / f"{variant_name(kind, length)}.yaml"
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            assert (folder / config["include"]).is_file()
            expected = variant_yaml(kind, length, config["include"], shipped_variant_tags(kind))
            assert path.read_text(encoding="utf-8") == expected


# --- generated documents -----------------------------------------------------------------------------------


def test_passkey_documents_have_the_asked_length_and_hide_the_key():
    tokenizer = ByteTokenizer()
    docs = passkey_docs(tokenizer, 200, num_docs=5)
    assert docs == passkey_docs(tokenizer, 200, num_docs=5)  # a pure function of the seed
    for doc in docs:
        assert len(doc["input"]) + len(doc["continuation"]) == 200  # bytes: one token each
        assert f"The pass key is {doc['target']}." in doc["input"]
        assert doc["input"].endswith("What is the pass key? The pass key is")
    assert len({doc["target"] for doc in docs}) == 5
    with pytest.raises(SetupError, match="do not fit in 64 tokens"):
        passkey_docs(tokenizer, 64, num_docs=1)


def test_needle_documents_place_the_needle_at_each_depth():
    tokenizer = ByteTokenizer()
    docs = needle_docs(tokenizer, 400, num_docs=11)
    assert [doc["depth"] for doc in docs] == [i / 10 for i in range(11)]
    for doc in docs:
        assert len(doc["input"]) + len(doc["continuation"]) == 400
        assert f"is: {doc['target']}." in doc["input"]
    first, last = docs[0]["input"], docs[-1]["input"]
    assert first.index(docs[0]["target"]) < 80 and last.index(docs[-1]["target"]) > 250
    multikey = needle_docs(tokenizer, 600, num_docs=3, needles=4)
    for doc in multikey:
        assert doc["input"].count("special magic numbers for") == 4
        word = doc["input"].rsplit("magic number for ", 1)[1].split(" ")[0]
        assert f"for {word} is: {doc['target']}." in doc["input"]


class Oracle:
    """An lm-eval LM that answers every generated task with `answer(doc target)` and is sure of it."""

    @staticmethod
    def make(answer):
        from lm_eval.api.model import LM

        class OracleLM(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [f" {answer(request.doc['target'])}. Remember it." for request in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                return [(0.0, request.args[1] == f" {answer(request.doc['target'])}") for request in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return OracleLM()


@pytest.mark.parametrize(("answer", "score"), [(lambda key: key, 1.0), (lambda key: str(int(key) + 1), 0.0)])
def test_generated_tasks_score_exact_matches(answer, score, tmp_path):
    """The task YAMLs score the key itself: right keys 1, off-by-one keys 0 (every metric, every kind)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    requests = resolve_tasks(LONGBENCH, list(SYNTHETIC), lengths=[640])
    manager = TaskManager(include_path=str(write_variants(requests, tmp_path)), include_defaults=False)
    names = [r.name for r in requests]
    out = simple_evaluate(model=Oracle.make(answer), tasks=names, task_manager=manager, limit=4)
    for name in names:
        metrics = out["results"][name]
        value = metrics.get("exact_match,first_number", metrics.get("acc,none"))
        assert value == score, (name, metrics)


# --- the commands ------------------------------------------------------------------------------------------


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_both_prints_the_comparison_and_writes_a_result_that_compare_reads(tmp_path):
    out = tmp_path / "both.json"
    args = ["--model", "micro", "--tasks", "passkey,passkey_ll", "--lengths", "128,160", "--limit", "2"]
    result = invoke("longbench", *args, "--batch-size", "2", "--both", "--log-samples", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "toroidal vs baseline" in result.output
    assert "[1/4] baseline: toroidal_passkey_128" in result.stderr  # which task is running
    record = read_result(out, command="longbench")
    rows = record["rows"]
    assert {r["attention"] for r in rows} == {"baseline", "toroidal"}
    assert {(r["task"], r["metric"]) for r in rows if r["attention"] == "toroidal"} == {
        ("toroidal_passkey_128", "exact_match"),
        ("toroidal_passkey_160", "exact_match"),
        ("toroidal_passkey_ll_128", "acc"),
        ("toroidal_passkey_ll_128", "perplexity"),
        ("toroidal_passkey_ll_160", "acc"),
        ("toroidal_passkey_ll_160", "perplexity"),
    }
    assert all(r["samples"] == 2 for r in rows)
    assert record["models"]["toroidal"]["toroidal"]["depth"] == 2
    assert record["models"]["baseline"]["toroidal"] is None
    assert record["lm_eval"]["version"] and record["lm_eval"]["task_versions"]["toroidal_passkey_128"] == 1.0
    assert {r["task"] for r in record["averages"]} == {"average"}
    assert len(record["comparison"]["rows"]) == len(rows) // 2 + len(record["averages"]) // 2
    samples = (tmp_path / "both.samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == 2 * 4 * 2  # attentions x tasks x samples
    assert {"attention", "task", "doc", "resps"} <= set(json.loads(samples[0]))

    again = invoke("longbench", *args, "--compare", str(out))
    assert again.exit_code == 0, again.output
    assert f"this run vs {out}" in again.output


def test_a_checkpoint_runs_as_trained_and_as_baseline(run_dir, tmp_path):
    out = tmp_path / "ckpt.json"
    args = ["--checkpoint", str(run_dir), "--tasks", "passkey", "--lengths", "128", "--limit", "2"]
    result = invoke("scrolls", *args, "--both", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = read_result(out, command="scrolls")
    assert record["models"]["toroidal"]["checkpoint"] == str(run_dir)
    assert record["models"]["toroidal"]["toroidal_layers"] == [0, 1]
    assert record["config"]["runs"] == ["baseline", "toroidal"]
    assert_one_line_error(invoke("longbench", *args, "--depth", "4"), "depth cannot change")


def test_user_errors_are_one_line(tmp_path):
    model = ["--model", "micro"]
    assert_one_line_error(
        invoke("longbench", *model, "--tasks", "passkey", "--lengths", "600"), "--max-length"
    )
    assert_one_line_error(invoke("longbench", *model, "--baseline", "--both"), "--baseline or --both")
    assert_one_line_error(invoke("longbench", "--tasks", "passkey"), "--checkpoint")
    missing = tmp_path / "no-run"
    assert_one_line_error(invoke("longbench", "--checkpoint", str(missing)), f"{missing} does not exist")
    assert_one_line_error(invoke("longbench", *model, "--log-samples"), "--log-samples needs --out")
    assert_one_line_error(
        invoke("longbench", *model, "--tasks", "passkey", "--lengths", "16"), "do not fit in 16 tokens"
    )
    bad = tmp_path / "other.json"
    bad.write_text("{}", encoding="utf-8")
    assert_one_line_error(invoke("longbench", *model, "--compare", str(bad)), "not a toroidal result")


@pytest.mark.parametrize(
    ("command", "task", "name"),
    [("longbench", "narrativeqa", "longbench_narrativeqa"), ("scrolls", "quality", "scrolls_quality")],
)
def test_offline_a_missing_dataset_is_one_line_naming_the_task(command, task, name, tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "empty-cache")  # nothing cached: the download is needed
    done = subprocess.run(
        [sys.executable, "-m", "toroidal_cli", command, "--model", "micro", "--tasks", task, "--limit", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert name in lines[0] and "--include-path" in lines[0] and "OFFLINE is set" in lines[0]
