"""Pictures of results: benchmark scaling, training curves, attention patterns, length extrapolation.

Each `plot_*` function takes data already loaded (bench rows, train result records,
an attention weight matrix, lines of a metric per evaluation length) and writes FILE.png plus
FILE.plot.json, the numbers drawn.
Both files are written atomically (a temp file beside them, then os.replace).
Figures have a fixed size and dpi and the PNG carries no software or time stamp,
so the same data gives the same bytes on one machine.

matplotlib comes with the optional `plot` extra; without it every
function raises `PlotUnavailable`. Only the object-oriented API is used (no pyplot),
so the global matplotlib backend is never touched.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from toroidal.runtime.install import missing_module_message

if TYPE_CHECKING:  # tensors come from the caller: importing this module needs no torch
    import torch

DPI = 100
BENCH_SIZE = (11.0, 9.0)  # inches; pixels = inches * DPI
TRAIN_SIZE = (11.0, 4.5)
ATTENTION_SIZE = (11.0, 5.0)
LENGTHS_SIZE = (9.0, 5.0)


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""

    def __init__(self):
        super().__init__(f"plotting {missing_module_message('matplotlib')}")


def require_matplotlib() -> None:
    """Raise `PlotUnavailable` unless matplotlib can be imported."""
    _figure_class()


def _figure_class():
    try:
        import matplotlib  # noqa: F401  (imported first so a blocked top-level package fails here)
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable() from None
    return Figure


def pixel_size(size: tuple[float, float]) -> tuple[int, int]:
    """The (width, height) in pixels of a figure of `size` inches."""
    return round(size[0] * DPI), round(size[1] * DPI)


# --- writing -------------------------------------------------------------------------------------------


def json_path(png: str | os.PathLike) -> Path:
    """Where a figure's numbers go: FILE.plot.json, a name no result file or run file has (FILE.json was
    the run's own metrics.json for `--out RUN/metrics.png`)."""
    return Path(png).with_suffix(".plot.json")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value):
    """JSON-safe numbers: NaN and infinity as null, floats rounded to 6 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def _save(figure, out: str | os.PathLike, numbers: dict) -> tuple[Path, Path]:
    png, data = Path(out), json_path(out)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    text = json.dumps(_clean(numbers), indent=1, allow_nan=False) + "\n"
    _atomic_write(png, buffer.getvalue())
    _atomic_write(data, text.encode("utf-8"))
    return png, data


def _new_figure(size: tuple[float, float]):
    return _figure_class()(figsize=size, dpi=DPI, layout="constrained")


def _no_data(axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")


# --- bench ---------------------------------------------------------------------------------------------


def _bench_columns(rows: list[dict]) -> tuple[str | None, list]:
    """Which axis splits the panels into columns (depth, else dtype), and its values in order."""
    for key in ("depth", "dtype"):
        values = list(dict.fromkeys(row.get(key) for row in rows))
        if len(values) > 1:
            return key, values
    return None, [None]


def _series_name(row: dict, split: str | None, varying: list[str]) -> str:
    parts = [str(row.get("source"))] if row.get("source") else []
    parts.append(str(row.get("backend")))
    if row.get("ring_world_size"):  # one line per world size of the ring rows
        parts.append(f"W={row['ring_world_size']}")
    parts += [f"{key}={row.get(key)}" for key in varying if key != split]
    return " ".join(parts)


def _floor(rows: list[dict], key: str) -> dict:
    """The fastest value of `key` per sequence length (the plain-SDPA reference lines)."""
    best: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best[row["seq_len"]] = min(value, best.get(row["seq_len"], math.inf))
    return {"seq_len": sorted(best), key: [best[n] for n in sorted(best)]}


def _colors(panels: list[dict]) -> dict[str, str]:
    """One colour per series name in every panel, assigned in sorted name order."""
    names = sorted({name for panel in panels for name in panel["series"]})
    return {name: f"C{index % 10}" for index, name in enumerate(names)}


def bench_numbers(rows: list[dict]) -> dict:
    """The numbers the bench plot draws: per column, series per backend over seq_len (each with its
    colour, the same in every panel), and the SDPA lines. Rows of one sweep or of several merged."""
    ok = [row for row in rows if row.get("status") == "ok"]
    split, values = _bench_columns(ok)
    varying = [key for key in ("dtype", "mode") if len({row.get(key) for row in ok}) > 1]
    panels = []
    for value in values:
        chosen = [row for row in ok if split is None or row.get(split) == value]
        series: dict[str, dict] = {}
        for row in sorted(chosen, key=lambda row: row["seq_len"]):
            line = series.setdefault(
                _series_name(row, split, varying),
                {"seq_len": [], "median_ms": [], "peak_memory_mb": [], "overhead": []},
            )
            for key in line:
                line[key].append(row.get(key))
        panels.append(
            {
                "split": split,
                "value": value,
                "series": series,
                "sdpa_torus": _floor(chosen, "sdpa_torus_ms"),
                "sdpa_standard": _floor(chosen, "sdpa_standard_ms"),
            }
        )
    colors = _colors(panels)
    for panel in panels:
        for name, line in panel["series"].items():
            line["color"] = colors[name]
    return {"kind": "bench", "rows": len(rows), "ok_rows": len(ok), "panels": panels}


def _points(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if isinstance(y, (int, float)) and y > 0]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _draw_series(axes, panel: dict, key: str) -> bool:
    drawn = False
    for name, line in panel["series"].items():
        xs, ys = _points(line["seq_len"], line[key])
        if xs:
            axes.plot(xs, ys, marker="o", markersize=3, label=name, color=line["color"])
            drawn = True
    return drawn


def _figure_legend(figure, axes_list) -> None:
    """One legend for the figure, right of the panels, where it covers no data: series sorted by name."""
    entries: dict[str, object] = {}
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    references = [label for label in entries if label.startswith("SDPA")]
    labels = sorted(label for label in entries if label not in references) + references
    if labels:
        figure.legend([entries[label] for label in labels], labels, loc="outside right upper", fontsize=7)


def _draw_reference(axes, panel: dict) -> None:
    torus, standard = panel["sdpa_torus"], panel["sdpa_standard"]
    if torus["seq_len"]:
        axes.plot(torus["seq_len"], torus["sdpa_torus_ms"], "k--", label="SDPA on L=N·D (floor)")
    if standard["seq_len"]:
        axes.plot(standard["seq_len"], standard["sdpa_standard_ms"], ":", color="gray", label="SDPA on N")


def _seq_len_ticks(axes, panel: dict) -> None:
    """Log-2 x axis labelled at the measured sequence lengths (32, 64, ... rather than 2^5, 2^6)."""
    from matplotlib.ticker import NullLocator

    seq_lens = sorted({n for line in panel["series"].values() for n in line["seq_len"]})
    axes.set_xscale("log", base=2)
    axes.set_xticks(seq_lens, [str(n) for n in seq_lens])
    axes.xaxis.set_minor_locator(NullLocator())


def plot_bench(rows: list[dict], out: str | os.PathLike, title: str = "toroidal bench") -> tuple[Path, Path]:
    """Time, peak memory and overhead versus sequence length, per backend; rows of `toroidal bench`.

    Only rows with status "ok" are drawn. One panel column per depth (or dtype) when the
    rows hold several. Rows with a "source" field (e.g. the file they came from) get it
    in their series name. Returns the paths of the PNG and the JSON.
    """
    numbers = bench_numbers(rows)
    figure = _new_figure(BENCH_SIZE)
    panels = numbers["panels"]
    grid = figure.subplots(3, len(panels), squeeze=False)
    for column, panel in enumerate(panels):
        time_axes, memory_axes, overhead_axes = grid[:, column]
        heading = title if panel["split"] is None else f"{title}: {panel['split']}={panel['value']}"
        time_axes.set_title(heading, fontsize=10)
        if _draw_series(time_axes, panel, "median_ms") or panel["sdpa_torus"]["seq_len"]:
            _draw_reference(time_axes, panel)
            _seq_len_ticks(time_axes, panel)
            time_axes.set_yscale("log")
        else:
            _no_data(time_axes)
        time_axes.set_ylabel("median time (ms)")
        if _draw_series(memory_axes, panel, "peak_memory_mb"):
            _seq_len_ticks(memory_axes, panel)
            memory_axes.set_yscale("log")
        else:
            _no_data(memory_axes)
        memory_axes.set_ylabel("peak memory (MiB)")
        if _draw_series(overhead_axes, panel, "overhead"):
            _seq_len_ticks(overhead_axes, panel)
            overhead_axes.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        else:
            _no_data(overhead_axes)
        overhead_axes.set_ylabel("× SDPA on L=N·D")
        overhead_axes.set_xlabel("sequence length N")
    _figure_legend(figure, grid.flat)
    return _save(figure, out, numbers)


# --- train ---------------------------------------------------------------------------------------------


def _perplexity(loss) -> float | None:
    return math.exp(min(loss, 700.0)) if isinstance(loss, (int, float)) else None


def train_numbers(runs: dict[str, dict]) -> dict:
    """Per run (name -> `toroidal train` record): the train loss curve and the validation points."""
    curves = {}
    for name, record in runs.items():
        history = record.get("loss_curve") or []
        evals = record.get("validation") or []
        curves[name] = {
            "train": {
                "step": [entry["step"] for entry in history],
                "loss": [entry.get("loss") for entry in history],
                "perplexity": [_perplexity(entry.get("loss")) for entry in history],
            },
            "validation": {
                "step": [entry["step"] for entry in evals],
                "loss": [entry.get("loss") for entry in evals],
                "perplexity": [entry.get("perplexity") for entry in evals],
            },
        }
    return {"kind": "train", "runs": curves}


def plot_train(runs: dict[str, dict], out: str | os.PathLike) -> tuple[Path, Path]:
    """Training (solid) and validation (dashed, markers) loss and perplexity of runs, overlaid by name."""
    numbers = train_numbers(runs)
    figure = _new_figure(TRAIN_SIZE)
    loss_axes, ppl_axes = figure.subplots(1, 2)
    for index, (name, curve) in enumerate(numbers["runs"].items()):
        color = f"C{index % 10}"
        for axes, key in ((loss_axes, "loss"), (ppl_axes, "perplexity")):
            xs, ys = _points(curve["train"]["step"], curve["train"][key])
            axes.plot(xs, ys, color=color, linewidth=1, label=f"{name} train")
            xs, ys = _points(curve["validation"]["step"], curve["validation"][key])
            axes.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=4, label=f"{name} val")
    loss_axes.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ppl_axes.set(title="perplexity", xlabel="step", ylabel="perplexity")
    ppl_axes.set_yscale("log")
    loss_axes.legend(fontsize=7)
    return _save(figure, out, numbers)


# --- attention -----------------------------------------------------------------------------------------


def position_weights(weights: torch.Tensor, depth: int) -> torch.Tensor:
    """(N*D, N*D) platter-token weights -> (N, N): summed over key platters, averaged over query platters.

    Platter-token p = i*D + k (position-major), so each row still sums to 1.
    """
    n = weights.shape[0] // depth
    return weights.reshape(n, depth, n, depth).sum(dim=3).mean(dim=1)


def _heat_map(figure, axes, matrix: torch.Tensor, title: str, label: str) -> None:
    image = axes.imshow(matrix.numpy(), cmap="viridis", interpolation="nearest", origin="upper")
    axes.set(title=title, xlabel=f"key {label}", ylabel=f"query {label}")
    figure.colorbar(image, ax=axes, shrink=0.8)


def _seams(axes, size: int, step: int) -> None:
    """Dashed lines where the ring wraps inside the sequence (every `step` rows/columns, period < N)."""
    for at in range(step, size, step):
        axes.axhline(at - 0.5, color="white", linestyle="--", linewidth=0.6)
        axes.axvline(at - 0.5, color="white", linestyle="--", linewidth=0.6)


MAX_TOKEN_LABELS = 40  # more token labels than this on an axis are unreadable


def _token_ticks(axes, tokens: list[str]) -> None:
    labels = [repr(token)[1:-1] for token in tokens]  # newlines and tabs visible, no quotes
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes.set_yticks(range(len(labels)), labels, fontsize=6)


def plot_attention(
    weights: torch.Tensor,
    depth: int,
    out: str | os.PathLike,
    settings: dict,
    tokens: list[str] | None = None,
) -> tuple[Path, Path]:
    """Heat maps of one head's weights: platter tokens (N*D x N*D) and positions (N x N).

    `settings` (seq_len, depth, lambda, window, causal, period, head, seed...) goes into
    the title and the JSON; its "period", when below N, draws the seams. `tokens` (the
    text of each position, for a trained model) label the position axes when few enough.
    """
    weights = weights.detach().float().cpu()
    positions = position_weights(weights, depth)
    n = positions.shape[0]
    figure = _new_figure(ATTENTION_SIZE)
    tokens_axes, positions_axes = figure.subplots(1, 2)
    _heat_map(figure, tokens_axes, weights, f"platter tokens ({n * depth}×{n * depth})", "platter-token")
    _heat_map(figure, positions_axes, positions, f"positions ({n}×{n}, platters averaged)", "position")
    if tokens is not None and len(tokens) <= MAX_TOKEN_LABELS:
        _token_ticks(positions_axes, tokens)
    period = settings.get("period") or n
    if period < n:
        _seams(tokens_axes, n * depth, period * depth)
        _seams(positions_axes, n, period)
    figure.suptitle("  ".join(f"{key}={value}" for key, value in settings.items()), fontsize=9)
    numbers = {
        "kind": "attention",
        "settings": settings,
        "platter_tokens": weights.tolist(),
        "positions": positions.tolist(),
    }
    if tokens is not None:
        numbers["tokens"] = tokens
    return _save(figure, out, numbers)


# --- lengths -------------------------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lengths_numbers(series: list[dict], metric: str = "perplexity") -> dict:
    """The numbers the lengths plot draws. Each series: `label`, `seq_len` (ascending), `mean`, and
    per point `low`, `high` (the spread of several runs) and `runs` (how many), and the training
    lengths of its runs `training_seq_len` (a list; empty when unknown). Adds a colour per series
    and the training-length marks: grey where several series share one, else the series' colour."""
    lines = [{**line, "color": f"C{index % 10}"} for index, line in enumerate(series)]
    owners: dict[int, list[str]] = {}
    for line in lines:
        for length in line.get("training_seq_len") or []:
            owners.setdefault(length, []).append(line["color"])
    marks = [
        {"seq_len": length, "color": colors[0] if len(colors) == 1 else "gray"}
        for length, colors in sorted(owners.items())
    ]
    return {"kind": "lengths", "metric": metric, "series": lines, "training": marks}


def plot_lengths(
    series: list[dict], out: str | os.PathLike, metric: str = "perplexity", title: str | None = None
) -> tuple[Path, Path]:
    """`metric` versus evaluation length, a line per series (`lengths_numbers`), as in ALiBi's figure:
    log-2 length axis, the training length a dashed vertical line, the min-max band of several runs.
    The metric axis is logarithmic where it spans more than a factor of 10."""
    from matplotlib.ticker import NullLocator

    numbers = lengths_numbers(series, metric)
    figure = _new_figure(LENGTHS_SIZE)
    axes = figure.subplots()
    drawn, lengths = [], set()
    for line in numbers["series"]:
        points = [
            (x, y, lo, hi, n)
            for x, y, lo, hi, n in zip(
                line["seq_len"], line["mean"], line["low"], line["high"], line["runs"], strict=True
            )
            if _finite(y)
        ]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        most = max(p[4] for p in points)
        label = line["label"] if most == 1 else f"{line['label']} (mean of {most}, min-max)"
        axes.plot(xs, ys, marker="o", markersize=4, color=line["color"], label=label)
        if most > 1:
            lows, highs = [p[2] for p in points], [p[3] for p in points]
            axes.fill_between(xs, lows, highs, color=line["color"], alpha=0.2, linewidth=0)
        drawn += ys
        lengths.update(xs)
    if not drawn:
        _no_data(axes)
    else:
        for mark in numbers["training"]:
            axes.axvline(
                mark["seq_len"], color=mark["color"], linestyle="--", linewidth=1,
                label=f"training length {mark['seq_len']}",
            )  # fmt: skip
            lengths.add(mark["seq_len"])
        axes.set_xscale("log", base=2)
        ticks = sorted(lengths)
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.xaxis.set_minor_locator(NullLocator())
        positive = [y for y in drawn if y > 0]
        if len(positive) == len(drawn) and max(drawn) > 10 * min(drawn):
            axes.set_yscale("log")
        axes.legend(fontsize=8)
    axes.set(
        title=title or f"{metric.replace('_', ' ')} versus evaluation length",
        xlabel="evaluation length (tokens per window)",
        ylabel=metric.replace("_", " "),
    )
    axes.grid(True, alpha=0.3)
    return _save(figure, out, numbers)
