"""`toroidal plot` and the --plot options: PNGs of the fixed size, the numbers beside them, clear errors."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal import plots
from toroidal.training import TrainConfig, train
from toroidal_cli.app import app
from toroidal_cli.results import make_record, write_result

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra (matplotlib)"
)

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    return runner.invoke(app, ["plot", *args])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def assert_plot(png: Path, size: tuple[float, float]) -> dict:
    assert png.stat().st_size > 1000
    assert png_size(png) == plots.pixel_size(size)
    assert not list(png.parent.glob(".*.tmp"))
    return json.loads(png.with_suffix(".plot.json").read_text())


def bench_row(backend: str, seq_len: int, depth: int, status: str = "ok") -> dict:
    ms = seq_len * depth / 100.0
    return {
        "backend": backend,
        "chosen": backend,
        "seq_len": seq_len,
        "depth": depth,
        "dtype": "fp32",
        "mode": "fwd",
        "status": status,
        "median_ms": ms * (2.0 if backend == "reference" else 1.2) if status == "ok" else None,
        "peak_memory_mb": float(seq_len) if status == "ok" else None,
        "sdpa_torus_ms": ms,
        "sdpa_standard_ms": ms / depth,
        "overhead": 2.0 if backend == "reference" else 1.2,
    }


@pytest.fixture
def bench_file(tmp_path) -> Path:
    rows = [bench_row(b, n, d) for b in ("reference", "sdpa") for d in (1, 2) for n in (16, 32, 64)]
    rows.append(bench_row("flash2", 64, 2, status="skipped"))
    return write_result(tmp_path / "bench.json", make_record("bench", {}, {"rows": rows, "summary": {}}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "micro-run"
    config = TrainConfig(
        model="micro", seq_len=16, batch_size=4, eval_batches=2, warmup_steps=1, steps=3, eval_every=2
    )
    result = train(config, out)
    write_result(out / "metrics.json", make_record("train", result.config, result.payload))
    return out


@needs_matplotlib
def test_plot_bench(bench_file, tmp_path):
    out = tmp_path / "pics" / "bench.png"
    result = invoke("bench", str(bench_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    numbers = assert_plot(out, plots.BENCH_SIZE)
    assert numbers["ok_rows"] == 12
    assert [panel["value"] for panel in numbers["panels"]] == [1, 2]  # one column per depth
    assert set(numbers["panels"][1]["series"]) == {"reference", "sdpa"}  # skipped rows left out
    assert numbers["panels"][0]["sdpa_torus"]["seq_len"] == [16, 32, 64]


@needs_matplotlib
def test_plot_bench_is_deterministic(bench_file, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert invoke("bench", str(bench_file), "--out", str(first)).exit_code == 0
    assert invoke("bench", str(bench_file), "--out", str(second)).exit_code == 0
    assert first.read_bytes() == second.read_bytes()


@needs_matplotlib
def test_a_plot_named_like_its_input_leaves_the_input_intact(bench_file):
    before = bench_file.read_bytes()
    out = bench_file.with_suffix(".png")  # bench.json -> bench.png: the numbers must not land in bench.json
    assert invoke("bench", str(bench_file), "--out", str(out)).exit_code == 0
    assert bench_file.read_bytes() == before
    assert_plot(out, plots.BENCH_SIZE)


@needs_matplotlib
def test_plot_several_bench_files_name_their_series(bench_file, tmp_path):
    other = tmp_path / "other.json"
    other.write_bytes(bench_file.read_bytes())
    out = tmp_path / "both.png"
    assert invoke("bench", str(bench_file), str(other), "--out", str(out)).exit_code == 0
    numbers = assert_plot(out, plots.BENCH_SIZE)
    assert "other reference" in numbers["panels"][0]["series"]


def _bench_file(path: Path, rows: list[dict]) -> Path:
    return write_result(path, make_record("bench", {}, {"rows": rows, "summary": {}}))


@needs_matplotlib
def test_files_of_one_n_each_draw_one_line_per_backend_across_them(tmp_path):
    files = [
        _bench_file(tmp_path / f"n{n}.json", [bench_row(b, n, 2) for b in ("reference", "sdpa")])
        for n in (16, 32)
    ]
    out = tmp_path / "lines.png"
    result = invoke("bench", *map(str, files), "--out", str(out))
    assert result.exit_code == 0, result.output
    (panel,) = assert_plot(out, plots.BENCH_SIZE)["panels"]
    assert set(panel["series"]) == {"reference", "sdpa"}  # merged: no file names in the series
    for name, line in panel["series"].items():
        assert line["seq_len"] == [16, 32], name
        assert line["median_ms"] == [bench_row(name, n, 2)["median_ms"] for n in (16, 32)]


@needs_matplotlib
def test_a_backend_has_one_colour_in_every_panel(tmp_path):
    # Depth 1 holds only sdpa, depth 2 both: colours come from the sorted names, not the order met.
    rows = [bench_row("sdpa", n, 1) for n in (16, 32)]
    rows += [bench_row(b, n, 2) for b in ("sdpa", "reference") for n in (16, 32)]
    out = tmp_path / "colours.png"
    assert invoke("bench", str(_bench_file(tmp_path / "b.json", rows)), "--out", str(out)).exit_code == 0
    panels = assert_plot(out, plots.BENCH_SIZE)["panels"]
    colours = {}
    for panel in panels:
        for name, line in panel["series"].items():
            assert colours.setdefault(name, line["color"]) == line["color"], name
    assert set(colours) == {"reference", "sdpa"} and len(set(colours.values())) == 2
    assert colours == {"reference": "C0", "sdpa": "C1"}


@needs_matplotlib
def test_plot_train(run_dir, tmp_path):
    out = tmp_path / "train.png"
    result = invoke("train", str(run_dir), str(run_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    numbers = assert_plot(out, plots.TRAIN_SIZE)
    curve = numbers["runs"]["micro-run"]
    assert curve["train"]["step"] == [1, 2, 3]
    assert curve["validation"]["step"] == [2, 3]


@needs_matplotlib
def test_train_plot_option(tmp_path):
    out, png = tmp_path / "run", tmp_path / "run.png"
    flags = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2"]
    result = runner.invoke(app, ["train", *flags, "--steps", "2", "--out", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert_plot(png, plots.TRAIN_SIZE)


@needs_matplotlib
def test_plot_attention(tmp_path):
    out = tmp_path / "attention.png"
    args = ["--seq-len", "8", "--depth", "2", "--causal", "--window", "2", "--period", "4", "--head", "1"]
    result = invoke("attention", *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    numbers = assert_plot(out, plots.ATTENTION_SIZE)
    tokens, positions = torch.tensor(numbers["platter_tokens"]), torch.tensor(numbers["positions"])
    assert tokens.shape == (16, 16) and positions.shape == (8, 8)
    assert torch.allclose(positions.sum(dim=1), torch.ones(8), atol=1e-4)
    assert torch.all(positions.triu(diagonal=1) == 0)  # the causal cut


@needs_matplotlib
def test_plot_attention_of_a_trained_run_on_text(run_dir, tmp_path):
    out = tmp_path / "trained.png"
    result = invoke("attention", "--checkpoint", str(run_dir), "--text", "a torus!", "--out", str(out))
    assert result.exit_code == 0, result.output
    numbers = assert_plot(out, plots.ATTENTION_SIZE)
    assert numbers["tokens"] == list("a torus!")  # the micro preset reads bytes
    assert numbers["settings"]["layer"] == 0 and numbers["settings"]["depth"] == 2
    tokens, positions = torch.tensor(numbers["platter_tokens"]), torch.tensor(numbers["positions"])
    assert tokens.shape == (16, 16) and positions.shape == (8, 8)
    assert torch.allclose(positions.sum(dim=1), torch.ones(8), atol=1e-4)
    assert torch.all(positions.triu(diagonal=1) == 0)  # a causal language model
    second = invoke("attention", "--checkpoint", str(run_dir), "--text", "a torus!", "--layer", "1",
                    "--head", "1", "--out", str(tmp_path / "other.png"))  # fmt: skip
    assert second.exit_code == 0, second.output
    other = json.loads((tmp_path / "other.plot.json").read_text())
    assert other["platter_tokens"] != numbers["platter_tokens"]


@needs_matplotlib
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--checkpoint", "RUN"], "--checkpoint needs --text"),
        (["--checkpoint", "RUN", "--text", "hi", "--depth", "4"], "--depth cannot change a trained run"),
        (["--text", "hi"], "--text needs --checkpoint or --model"),
        (["--model", "tiny"], "--model needs --text"),
        (["--model", "tiny", "--text", "hi", "--seq-len", "8"], "--seq-len cannot change a pretrained model"),
        (["--model", "tiny", "--checkpoint", "RUN", "--text", "hi"], "exclude each other"),
        (["--model", "no/such.gguf", "--text", "hi"], "no/such.gguf"),
        (["--checkpoint", "RUN", "--text", "hi", "--layer", "9"], "layer 9 is not a toroidal layer"),
        (["--checkpoint", "RUN", "--text", "x" * 1500], "more than the 2048"),
        (["--checkpoint", "no/such/run", "--text", "hi"], "does not exist"),
        (["--window", "w"], "--window"),
    ],
)
def test_attention_option_errors(run_dir, tmp_path, args, fragment):
    args = [str(run_dir) if arg == "RUN" else arg for arg in args]
    result = invoke("attention", *args, "--out", str(tmp_path / "a.png"))
    assert_one_line_error(result, "toroidal plot attention:", fragment)
    assert not (tmp_path / "a.png").exists()


@needs_matplotlib
def test_attention_settings_from_a_config_file_with_flags_over_it(tmp_path):
    config = tmp_path / "attention.yaml"
    config.write_text("seq-len: 6\ndepth: 2\ncausal: true\nperiod: 3\n", encoding="utf-8")
    out = tmp_path / "a.png"
    result = invoke("attention", "--config", str(config), "--seq-len", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "a.plot.json").read_text())
    assert numbers["settings"]["seq_len"] == 5 and numbers["settings"]["period"] == 3
    assert torch.tensor(numbers["positions"]).shape == (5, 5)
    config.write_text("depth: 2\nsurprise: 1\n", encoding="utf-8")
    result = invoke("attention", "--config", str(config), "--out", str(out))
    assert_one_line_error(result, "unknown key(s) surprise")


@needs_matplotlib
def test_attention_bad_head_is_a_user_error(tmp_path):
    result = invoke("attention", "--seq-len", "8", "--head", "5", "--out", str(tmp_path / "a.png"))
    assert_one_line_error(result, "head 5")


@needs_matplotlib
def test_out_must_be_a_png(bench_file, tmp_path):
    result = invoke("bench", str(bench_file), "--out", str(tmp_path / "bench.jpg"))
    assert_one_line_error(result, ".png")


def test_missing_matplotlib_is_one_clear_line(bench_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "bench.png"
    result = invoke("bench", str(bench_file), "--out", str(out))
    assert_one_line_error(result, "matplotlib", 'pip install -e ".[plot]"')
    assert not out.exists()
    with pytest.raises(plots.PlotUnavailable):
        plots.plot_bench([], out)
