"""Safe loading: nothing is unpickled, evaluated or run from a file or a hub repository unless asked,
config paths are relative to their file, and a config file cannot send writes outside its folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.training import hub
from toroidal_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "toroidal").rglob("*.py"), *(ROOT / "toroidal_cli").rglob("*.py")])
# Pickles a process exchanges with children it started itself, never files a user hands in: the
# benchmark's worker pipe, and the ring launcher's per-rank results in its own temporary folder.
PICKLE_ALLOWED = {ROOT / "toroidal" / "bench" / "worker.py", ROOT / "toroidal" / "runtime" / "launch.py"}

runner = CliRunner()


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            )
            yield node, owner, name


def _keyword(node: ast.Call, name: str):
    return next((kw.value for kw in node.keywords if kw.arg == name), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_sources_never_evaluate_or_unpickle_untrusted_data(path):
    for node, owner, name in _calls(path):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        builtin = isinstance(node.func, ast.Name)  # eval(...), not model.eval()
        assert not (builtin and name in ("eval", "exec", "compile")), f"{where}: {name}() of data"
        assert not (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all")), where
        if owner == "torch" and name == "load":
            weights_only = _keyword(node, "weights_only")
            assert isinstance(weights_only, ast.Constant) and weights_only.value is True, where
        if owner == "pickle" and name in ("load", "loads"):
            assert path in PICKLE_ALLOWED, f"{where}: unpickling outside the bench worker pipe"
        remote = _keyword(node, "trust_remote_code")
        assert not (isinstance(remote, ast.Constant) and remote.value is True), f"{where}: remote code on"


def test_remote_code_is_off_unless_asked_for():
    assert hub.trust_remote_code() is False
    with hub.remote_code_trusted(True):
        assert hub.trust_remote_code() is True
    assert hub.trust_remote_code() is False


@pytest.fixture()
def local_model(tmp_path):
    """A micro Llama saved with save_pretrained, as a local model folder."""
    from toroidal.training.models import build_model, resolve_model
    from toroidal.training.tokenization import ByteTokenizer

    folder = tmp_path / "model"
    build_model(resolve_model("micro"), ByteTokenizer(), 32, seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_trust_remote_code_reaches_transformers_only_when_given(local_model, monkeypatch, flag):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(spy))
    args = ["eval", "--model", str(local_model), "--tokenizer", "bytes", "--seq-len", "16", "--dry-run"]
    result = runner.invoke(app, args + flag)
    assert result.exit_code == 0, result.output
    assert seen and all(value is bool(flag) for value in seen)


def test_yaml_tags_that_would_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f'seq_len: !!python/object/apply:os.system ["touch {marker}"]\n')
    for command in (["train", "--model", "micro"], ["bench"], ["profile"]):
        result = runner.invoke(app, [*command, "--config", "evil.yaml", "--dry-run"])
        assert_one_line_error(result, "evil.yaml is not valid YAML")
    assert not marker.exists()


def test_result_files_are_parsed_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    expression = f"{{'schema': __import__('os').system('touch {marker}')}}"
    (tmp_path / "old.json").write_text(expression)
    result = runner.invoke(
        app, ["plot", "bench", str(tmp_path / "old.json"), "--out", str(tmp_path / "p.png")]
    )
    assert_one_line_error(result, "old.json is not valid JSON")
    assert not marker.exists()


# --- paths in config files -------------------------------------------------------------------------------


def _setting(output: str, key: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {key} "))


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "a.txt").write_text("some text\n" * 50)
    (experiment / "run.yaml").write_text("model: micro\ndataset: text:a.txt\nout: runs/a\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["train", "--config", "../exp/run.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "│ text:../exp/a.txt " in _setting(result.output, "dataset")
    assert "│ ../exp/runs/a " in _setting(result.output, "out")
    assert list(elsewhere.iterdir()) == []


def test_a_config_cannot_send_writes_outside_its_folder(tmp_path, monkeypatch):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "run.yaml").write_text("model: micro\nout: ../../escaped\n")
    monkeypatch.chdir(experiment)
    result = runner.invoke(app, ["train", "--config", "run.yaml", "--steps", "1"])
    assert_one_line_error(result, "would write outside the config file's folder", "pass --out")
    assert not (tmp_path.parent / "escaped").exists()
    # Asked for on the command line, the same folder is fine.
    result = runner.invoke(app, ["train", "--config", "run.yaml", "--out", "../../escaped", "--dry-run"])
    assert result.exit_code == 0, result.output
