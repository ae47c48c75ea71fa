"""The lm-eval model wrapper: tokenizer adapter, exact log-likelihoods, simple_evaluate and lm-eval's CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from toroidal.integrations.lm_eval import ToroidalLM, as_hf_tokenizer, build_lm, spec_from_args  # noqa: E402
from toroidal.longcontext import ModelSpec  # noqa: E402
from toroidal.training import TrainConfig, train  # noqa: E402
from toroidal.training.tokenization import BpeTokenizer, ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = "A ring of positions wraps around; platters see the seam. Ünïcode too: ∮ ring.\n"
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Three tiny tasks over one JSONL file, one per request type HFLM serves.
DOCS = [
    {"context": f"Question {i}: what comes after {i}? Answer:", "answer": f" {i + 1}", "text": TEXT * (i + 1)}
    for i in range(4)
]
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
TASKS = {
    "tiny_ll": """task: tiny_ll
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: perplexity
""",
    "tiny_rolling": """task: tiny_rolling
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
""",
    "tiny_gen": """task: tiny_gen
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    for name, body in TASKS.items():
        common = COMMON.format(data=data, cache=folder / "cache")
        (folder / f"{name}.yaml").write_text(body + common, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A micro toroidal run (toroidal layer 1), trained for a few steps."""
    folder = tmp_path_factory.mktemp("run") / "toroidal"
    micro = dict(model="micro", seq_len=16, batch_size=4, eval_batches=1, warmup_steps=1, eval_every=0)
    train(TrainConfig(**micro, steps=3, layers=[1]), folder)
    return folder


# --- the tokenizer adapter ---------------------------------------------------------------------------------


def test_byte_tokenizer_becomes_a_transformers_tokenizer_with_the_same_ids():
    ours, hf = ByteTokenizer(), as_hf_tokenizer(ByteTokenizer())
    assert hf.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT).tolist()
    assert hf.encode(TEXT) == ours.encode(TEXT).tolist()  # no special tokens are added
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    assert hf.decode(ours.encode(TEXT).tolist()) == TEXT
    assert hf.decode([ord("a"), ours.eos_id, ord("b")], skip_special_tokens=True) == "ab"
    assert len(hf) == ours.vocab_size
    hf.padding_side = "left"
    batch = hf(["ab", "abcd"], padding="longest", return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [ours.pad_id, ours.pad_id, ord("a"), ord("b")]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1]


def test_bpe_tokenizer_keeps_its_ids():
    ours = BpeTokenizer.train([TEXT] * 20, vocab_size=300)
    hf = as_hf_tokenizer(ours)
    assert hf.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT).tolist()
    assert hf.eos_token_id == ours.eos_id and hf.pad_token_id == ours.pad_id


# --- the wrapper -------------------------------------------------------------------------------------------


def _manual_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(start, len(ids))))


def test_loglikelihoods_are_those_of_the_model():
    """HFLM's request handling over the adapted tokenizer computes exactly the model's probabilities."""
    lm = build_lm(ModelSpec(pretrained="micro", layers=[1]), device="cpu", batch_size=2)
    assert lm.loaded.attention == "toroidal" and lm.loaded.layers == [1]
    tokenizer = lm.loaded.tokenizer
    context, continuation = "The ring wraps", " around"
    request = Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    ((logprob, _greedy),) = lm.loglikelihood([request])
    ids = (tokenizer.encode(context).tolist(), tokenizer.encode(continuation).tolist())
    assert logprob == pytest.approx(_manual_logprob(lm.model, ids[0] + ids[1], len(ids[0])), abs=1e-4)

    rolling = Instance("loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)
    (total,) = lm.loglikelihood_rolling([rolling])
    with_bos = [tokenizer.bos_id, *tokenizer.encode(TEXT).tolist()]  # lm-eval's prefix token is <bos>
    assert total == pytest.approx(_manual_logprob(lm.model, with_bos, 1), abs=1e-3)


def test_simple_evaluate_runs_every_request_type(task_dir):
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    lm = build_lm(ModelSpec(pretrained="micro"), device="cpu", batch_size=2)
    out = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, limit=3, bootstrap_iters=10)
    results = out["results"]
    assert 0.0 <= results["tiny_ll"]["acc,none"] <= 1.0
    assert math.isfinite(results["tiny_ll"]["perplexity,none"])
    assert results["tiny_rolling"]["bits_per_byte,none"] > 0
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert out["n-samples"]["tiny_gen"]["effective"] == 3
    assert out["config"]["toroidal_model"]["attention"] == "toroidal"


def test_checkpoints_load_as_trained_or_as_baseline(run_dir):
    trained = ToroidalLM(checkpoint=str(run_dir), device="cpu")
    assert trained.loaded.attention == "toroidal" and trained.loaded.layers == [1]
    baseline = ToroidalLM(checkpoint=str(run_dir), attention="baseline", device="cpu")
    assert baseline.loaded.attention == "baseline" and baseline.loaded.toroidal is None
    request = [Instance("loglikelihood", doc={}, arguments=("The ring", " wraps"), idx=0)]
    assert trained.loglikelihood(request)[0][0] != pytest.approx(baseline.loglikelihood(request)[0][0])
    retuned = ToroidalLM(checkpoint=str(run_dir), period=64, window=8, device="cpu")
    assert (retuned.loaded.toroidal.period, retuned.loaded.toroidal.window) == (64, 8)
    with pytest.raises(ValueError, match="depth cannot change a toroidal checkpoint"):
        ToroidalLM(checkpoint=str(run_dir), depth=4, device="cpu")


def test_registered_model_takes_lm_eval_arguments():
    assert get_model("toroidal") is ToroidalLM
    lm = ToroidalLM.create_from_arg_string(
        "pretrained=micro,lambda=0.25,layers=0;1,period=64,window=none", {"device": "cpu", "batch_size": 2}
    )
    config = lm.loaded.toroidal
    assert (config.lambda_distance, config.period, config.window) == (0.25, 64, None)
    assert lm.loaded.layers == [0, 1] and lm.batch_size == 2
    assert spec_from_args({"pretrained": "micro", "attention": "baseline"}).attention == "baseline"
    with pytest.raises(ValueError, match="unknown toroidal model argument"):
        spec_from_args({"pretrained": "micro", "depht": 2})


def test_lm_eval_command_line_runs_the_toroidal_model(task_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--model", "toroidal", "--model_args", "pretrained=micro,depth=2", "--tasks", "tiny_ll,tiny_gen"]
    args += ["--include_path", str(task_dir), "--limit", "2", "--device", "cpu", "--output_path", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "toroidal.integrations.lm_eval", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_gen" in done.stdout  # lm-eval's own results table
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert set(results["results"]) == {"tiny_ll", "tiny_gen"}
    assert results["config"]["model"] == "toroidal"
