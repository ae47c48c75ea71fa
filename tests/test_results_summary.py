"""results/summarize.py writes each summary.md from the result JSONs: the numbers come from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
spec = importlib.util.spec_from_file_location("summarize", RESULTS / "summarize.py")
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)

ENV = {"device_name": "cpu model", "cpu_count": 2, "torch": "2.x"}


def eval_result(train_len: int, perplexities: dict[int, float]) -> dict:
    scored = {"dataset": "text:/data/test.txt", "tokens": 4096}
    rows = [{"seq_len": n, "metrics": {"perplexity": p}, "scored": scored} for n, p in perplexities.items()]
    return {"env": ENV, "rows": rows, "summary": {"training_seq_len": train_len}}


def write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_extrapolation_gives_mean_and_spread_per_arm_and_length(tmp_path):
    write(tmp_path / "rope-seed0.json", eval_result(128, {128: 10.0, 256: 20.0}))
    write(tmp_path / "rope-seed1.json", eval_result(128, {128: 12.0, 256: 30.0}))
    write(tmp_path / "alibi-seed0.json", eval_result(128, {128: 11.0, 256: 11.0}))
    text = summarize.extrapolation(tmp_path)
    assert "| rope | 2 | 11.00 ± 1.41 | 25.00 ± 7.07 | 2.25 ± 0.35 |" in text
    assert "| alibi | 1 | 11.00 | 11.00 | 1.00 |" in text
    assert "256 (2x)" in text and "4,096 tokens of test.txt" in text


def test_real_model_lists_each_arm_with_its_retrieval_accuracy(tmp_path):
    write(tmp_path / "eval-base.json", eval_result(None, {512: 24.9, 1024: 19.8}))
    write(tmp_path / "eval-toroidal-l0.json", eval_result(512, {512: 30.0, 1024: 40.0}))
    rows = [
        {"task": "toroidal_needle_512", "metric": "exact_match", "value": 0.7, "samples": 10},
        {"task": "toroidal_passkey_512", "metric": "exact_match", "value": 0.5, "samples": 10},
        {"task": "toroidal_passkey_512", "metric": "contains", "value": 0.9, "samples": 10},
    ]
    write(tmp_path / "longbench-toroidal-l0.json", {"rows": rows})
    train = {
        "config": {"layers": [0], "steps": 40, "batch_size": 2, "seq_len": 512, "lr": 1e-4, "seed": 0},
        "model": {"trainable_parameters": 1234},
        "timing": {"wall_time_s": 300.0},
        "final": {"tokens": 40960},
    }
    write(tmp_path / "train-toroidal-l0.json", train)
    text = summarize.real_model(tmp_path)
    assert "| ppl @ 512 | ppl @ 1024 | passkey @ 512 | needle @ 512 |" in text
    assert "| base | none | 0 | - | 24.90 | 19.80 | - | - |" in text
    assert "| toroidal-l0 | 0 | 1,234 | 300 | 30.00 | 40.00 | 50% | 70% |" in text
    assert "40,960 tokens" in text and "10 generated samples" in text


def test_real_model_sets_each_toroidal_arm_beside_its_control(tmp_path):
    write(tmp_path / "eval-base.json", eval_result(None, {512: 20.0}))
    write(tmp_path / "eval-toroidal-l0.json", eval_result(512, {512: 22.0}))
    write(tmp_path / "eval-standard-l0.json", eval_result(512, {512: 20.0}))
    text = summarize.real_model(tmp_path)
    order = [text.index(f"| {name} |") for name in ("base", "toroidal-l0", "standard-l0")]
    assert order == sorted(order)
    assert "- toroidal-l0 vs standard-l0: +10.0% @ 512" in text
