"""Property tests at the command level: random option combinations and malformed config and result files
never produce a traceback, the exit code agrees with the output, and no file but a requested output
changes.

Every command runs with `--dry-run` (or fails validating before it), so an example costs milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from toroidal_cli.app import app
from toroidal_cli.results import make_record, write_result

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
DONE = "dry run: nothing was run or written"
EXAMPLES = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def offline():
    """Model names that look like hub names must fail offline at once, not probe the network."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("TOROIDAL_MEMORY_LIMIT_GB", raising=False)
        yield


@contextlib.contextmanager
def fresh_folder():
    """A new empty working directory for one example (function fixtures do not reset per example)."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(previous)


def snapshot(folder: Path) -> dict:
    return {
        path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in folder.rglob("*")
    }


def check(args: list[str], folder: Path) -> None:
    """Run `toroidal ARGS` in `folder` and check the invariants; the folder must not change."""
    before = snapshot(folder)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in output, (args, output)
    if result.exit_code == 0:
        assert DONE in result.stdout, (args, output)
    elif result.exit_code == 2:  # Typer's own usage error: an option of the wrong type
        assert "Usage:" in output, (args, output)
    else:
        assert result.exit_code == 1, (args, result.exit_code, output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("toroidal "), (args, result.stderr)
        assert DONE not in result.stdout
    assert snapshot(folder) == before, args


def options(choices: dict[str, list[str]]):
    """Some of the options, each with one of its candidate values (valid or not)."""
    return st.dictionaries(st.sampled_from(sorted(choices)), st.just(None), max_size=len(choices)).flatmap(
        lambda picked: st.fixed_dictionaries({name: st.sampled_from(choices[name]) for name in picked})
    )


def as_args(picked: dict[str, str]) -> list[str]:
    args = []
    for name, value in picked.items():
        args += [name] if value is None else [name, value]
    return args


BENCH_OPTIONS = {
    "--backend": ["auto", "sdpa", "reference,blockwise", "all", "bogus", ""],
    "--seq-len": ["64", "128,256", "0", "-3", "abc", "none", "2.5"],
    "--depth": ["1", "2", "4", "3", "0"],
    "--heads": ["1", "2", "8", "0"],
    "--d-model": ["32", "64", "33", "0"],
    "--head-dim": ["16", "7"],
    "--dtype": ["fp32", "bf16", "half", "int8"],
    "--mode": ["fwd", "fwd+bwd", "train", "backward"],
    "--window": ["none", "4", "-1", "x"],
    "--lambda": ["0.1", "0", "-1", "inf", "nan"],
    "--period": ["none", "16", "0"],
    "--causal": [None],
    "--no-causal": [None],
    "--device": ["cpu", "tpu", "cuda:99"],
    "--warmup": ["0", "-1"],
    "--repeats": ["1", "0"],
    "--memory-budget-gb": ["1", "none", "-2"],
    "--fail-on-regression": ["5"],
}


@EXAMPLES
@given(picked=options(BENCH_OPTIONS))
def test_bench_option_combinations(picked):
    with fresh_folder() as folder:
        check(["bench", *as_args(picked), "--dry-run"], folder)


PROFILE_OPTIONS = {**{k: v for k, v in BENCH_OPTIONS.items() if k != "--fail-on-regression"}}
PROFILE_OPTIONS.update({"--top": ["1", "0", "many"], "--trace": ["t.json"]})
PROFILE_OPTIONS.pop("--memory-budget-gb")


@EXAMPLES
@given(picked=options(PROFILE_OPTIONS))
def test_profile_option_combinations(picked):
    with fresh_folder() as folder:
        check(["profile", *as_args(picked), "--dry-run"], folder)


TRAIN_OPTIONS = {
    "--model": ["micro", "tiny", "nonexistent-model", "./missing", "bad name!"],
    "--attention": ["toroidal", "baseline", "other"],
    "--depth": ["1", "2", "3"],
    "--lambda": ["0.1", "-1"],
    "--period": ["none", "16", "zero"],
    "--window": ["none", "4"],
    "--fusion": ["low_rank", "mean", "spiral"],
    "--layers": ["all", "0", "0,1", "7", "x"],
    "--dataset": ["periodic", "passkey", "sinusoidal", "text:missing.txt", "unknown"],
    "--tokenizer": ["auto", "bytes", "bpe:64", "bpe:1024", "model"],
    "--seq-len": ["16", "32", "0", "100000"],
    "--batch-size": ["1", "4", "0"],
    "--steps": ["5", "2k", "0", "none"],
    "--tokens": ["1M"],
    "--precision": ["fp32", "bf16"],
    "--grad-accum": ["1", "0"],
    "--resume": [None],
    "--freeze-base": [None],
    "--device": ["cpu", "auto", "cuda:7", "gpu"],
}


@EXAMPLES
@given(picked=options(TRAIN_OPTIONS))
def test_train_option_combinations(picked):
    with fresh_folder() as folder:
        check(["train", *as_args(picked), "--out", "run", "--dry-run"], folder)


EVAL_OPTIONS = {k: v for k, v in TRAIN_OPTIONS.items() if k not in ("--steps", "--tokens", "--grad-accum")}
EVAL_OPTIONS.pop("--resume")
EVAL_OPTIONS.pop("--freeze-base")
EVAL_OPTIONS.update({"--max-batches": ["1", "0", "none"], "--checkpoint": ["missing-run"]})


@EXAMPLES
@given(picked=options(EVAL_OPTIONS))
def test_eval_option_combinations(picked):
    with fresh_folder() as folder:
        check(["eval", *as_args(picked), "--dry-run"], folder)


# --- malformed files ------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
CONFIG_KEYS = [
    "seq_len",
    "depth",
    "batch",
    "batch_size",
    "backend",
    "model",
    "dataset",
    "lambda",
    "out",
    "bogus",
]
configs = st.one_of(
    st.text(max_size=60),  # anything, mostly not YAML of a mapping
    st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4).map(yaml.safe_dump),
)


@EXAMPLES
@given(text=configs, command=st.sampled_from(["train", "bench", "profile"]))
def test_malformed_config_files(text, command):
    with fresh_folder() as folder:
        (folder / "cfg.yaml").write_text(text, encoding="utf-8")
        extra = ["--model", "micro"] if command == "train" else []
        check([command, "--config", "cfg.yaml", *extra, "--dry-run"], folder)


def _result_texts(command: str):
    """Not JSON, JSON of any shape, or a result record of `command` whose payload is anything."""
    records = st.dictionaries(st.sampled_from(["rows", "metrics", "summary"]), json_values, max_size=3).map(
        lambda payload: json.dumps(make_record(command, {}, payload, env={}))
    )
    return st.one_of(st.text(max_size=40), json_values.map(json.dumps), records)


@EXAMPLES
@given(data=st.data(), use=st.sampled_from(["plot bench", "bench --compare", "eval --compare"]))
def test_malformed_result_files(data, use):
    text = data.draw(_result_texts("eval" if use.startswith("eval") else "bench"))
    with fresh_folder() as folder:
        (folder / "old.json").write_text(text, encoding="utf-8")
        if use == "plot bench":
            args = ["plot", "bench", "old.json", "--out", "p.png", "--dry-run"]
        elif use == "bench --compare":
            args = ["bench", "-n", "64", "-b", "sdpa", "--compare", "old.json", "--dry-run"]
        else:
            args = ["eval", "--model", "micro", "--seq-len", "16", "--compare", "old.json", "--dry-run"]
        check(args, folder)


def test_a_valid_result_file_passes_the_same_checks(tmp_path, monkeypatch):
    """The properties above also hold on the happy path (so they are not vacuous)."""
    monkeypatch.chdir(tmp_path)
    write_result(
        tmp_path / "old.json", make_record("bench", {}, {"rows": [{"status": "ok", "backend": "sdpa"}]})
    )
    result = runner.invoke(app, ["plot", "bench", "old.json", "--out", "p.png", "--dry-run"])
    assert result.exit_code == 0 and DONE in result.stdout
