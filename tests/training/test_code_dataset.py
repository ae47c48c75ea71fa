"""`--dataset code:DIR[:EXT,...]`: source files of a local repository, split by file."""

from __future__ import annotations

import shutil

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.training import text_files as code_data
from toroidal.training.data import load_eval_text, load_train_texts, parse_dataset_spec, split_text
from toroidal.training.errors import SetupError
from toroidal.training.text_files import code_files, in_validation, load_code_texts, parse_code_spec
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def write(root, relative: str, text: str = "", data: bytes | None = None):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def repo(tmp_path):
    """A small repository with code, docs and everything the walk must leave out."""
    root = tmp_path / "repo"
    write(root, "src/ring.py", "def ring(i, j, p):\n    m = abs(i - j) % p\n    return min(m, p - m)\n")
    write(root, "src/torus.rs", "fn torus(d: usize) -> usize { d * 2 }\n")
    write(root, "lib/platter.c", "int platter(int k) { return k; }")  # no final newline
    write(root, "README.md", "# ring\n")
    write(root, "notes.txt", "not source\n")  # not a default extension
    write(root, "blob.py", data=b"\x00\x01binary")
    write(root, "node_modules/dep/index.js", "module.exports = 1;\n")
    write(root, "vendor/lib.go", "package lib\n")
    write(root, ".git/hooks/hook.py", "print('hidden')\n")
    write(root, ".secret.py", "KEY = 1\n")
    write(root, "big.py", "x = 1\n" * 40)
    (root / "link.py").symlink_to(root / "src" / "ring.py")
    return root


def relative(root, files) -> list[str]:
    return [f.relative_to(root).as_posix() for f in files]


def test_the_walk_finds_source_files_only(repo, monkeypatch):
    monkeypatch.setattr(code_data, "MAX_FILE_BYTES", 200)  # big.py (240 bytes) is over it
    expected = ["README.md", "lib/platter.c", "src/ring.py", "src/torus.rs"]
    assert relative(repo, code_files(repo)) == expected
    assert relative(repo, code_files(repo, ("rs", "c"))) == ["lib/platter.c", "src/torus.rs"]
    assert relative(repo, code_files(repo, ("txt",))) == ["notes.txt"]


def test_extension_lists_and_spec_round_trip(repo):
    assert parse_code_spec(f"{repo}:.py, RS") == (str(repo), ("py", "rs"))
    assert parse_code_spec(str(repo)) == (str(repo), None)
    spec = parse_dataset_spec(f"code:{repo}:py,rs")
    assert spec.kind == "code" and spec.is_text and spec.extensions == ("py", "rs")
    assert str(spec) == f"code:{repo}:py,rs"
    assert parse_dataset_spec(str(spec)) == spec
    with pytest.raises(SetupError, match="comma list"):
        parse_dataset_spec(f"code:{repo}:")
    with pytest.raises(SetupError, match="unknown dataset"):
        parse_dataset_spec("code:")


def test_files_are_split_whole_by_path_hash_on_any_machine(tmp_path):
    root = tmp_path / "many"
    names = [f"pkg{i % 3}/module_{i}.py" for i in range(60)]
    for i, name in enumerate(names):
        write(root, name, f"VALUE_{i} = {i}\n")
    texts = load_code_texts(str(root), None)
    held_out = sorted(name for name in names if in_validation(name))
    assert 0 < len(held_out) < len(names) // 4  # about 10% of the files
    for i, name in enumerate(names):  # every file lies in exactly one split, whole
        line = f"VALUE_{i} = {i}\n"
        assert (line in texts["validation"]) == (name in held_out)
        assert (line in texts["train"]) != (name in held_out)
    train = sorted((name, i) for i, name in enumerate(names) if name not in held_out)  # path order
    assert texts["train"] == "\n".join(f"VALUE_{i} = {i}\n" for _, i in train)  # a blank line between
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, moved)
    assert load_code_texts(str(moved), None) == texts


def test_small_repositories_still_hold_a_file_out(tmp_path):
    root = tmp_path / "small"
    kept = [name for name in (f"m{i}.py" for i in range(50)) if not in_validation(name)][:2]
    for name in kept:
        write(root, name, f"# {name}\n")
    texts = load_code_texts(str(root), None)
    assert texts == {"train": f"# {kept[0]}\n", "validation": f"# {kept[1]}\n"}
    single = tmp_path / "single"
    write(single, "only.py", "".join(f"line_{i} = {i}\n" for i in range(20)))
    texts = load_code_texts(str(single), None)
    content = (single / "only.py").read_text()
    assert (texts["train"], texts["validation"]) == split_text(content)  # the last 10%, as for text:PATH
    assert texts["validation"].startswith("line_1") and texts["train"] + texts["validation"] == content


def test_eval_text_is_the_held_out_files(repo):
    spec = parse_dataset_spec(f"code:{repo}")
    assert load_eval_text(spec) == load_train_texts(spec)["validation"] != ""


def test_missing_folders_and_empty_selections_name_the_fix(repo, tmp_path):
    with pytest.raises(SetupError, match="does not exist") as error:
        code_files(tmp_path / "nowhere")
    assert "code:DIR" in error.value.fix
    with pytest.raises(SetupError, match="is a file"):
        code_files(repo / "README.md")
    with pytest.raises(SetupError, match=r"no source files \(\.zig\)") as error:
        code_files(repo, ("zig",))
    assert "code:DIR:EXT,EXT" in error.value.fix


# --- through the command line ------------------------------------------------------------------------

MICRO = ["--model", "micro", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]


def test_train_and_eval_on_a_repository(repo, tmp_path):
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app, ["train", *MICRO, "--dataset", f"code:{repo}:py,rs,c,md", "--steps", "2", "--out", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    record = read_result(run_dir / "metrics.json", command="train")
    assert record["config"]["dataset"] == f"code:{repo}:py,rs,c,md"
    assert record["final"]["val_bits_per_byte"] > 0

    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run_dir), "--max-batches", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_result(out, command="eval")["config"]["dataset"] == f"code:{repo}:py,rs,c,md"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_missing_folder_is_one_line(command, tmp_path):
    args = [command, "--model", "micro", "--dataset", f"code:{tmp_path / 'absent'}"]
    result = runner.invoke(app, args + (["--out", str(tmp_path / "run")] if command == "train" else []))
    assert_one_line_error(result, "does not exist", "code:DIR")
