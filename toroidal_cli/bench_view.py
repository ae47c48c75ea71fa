"""How `toroidal bench` draws its rows: the sweep table, the `--compare` table and the `--tune` winners.

Only the axes whose values differ between rows get a column; the fixed ones go to the caption
(`device=cpu · dtype=fp32 · ...`).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from toroidal_cli import compare, render

_AXIS_COLUMNS = (
    ("device", "device"),
    ("dtype", "dtype"),
    ("mode", "mode"),
    ("causal", "causal"),
    ("window", "window"),
    ("lambda", "λ"),
    ("period", "P"),
    ("batch", "B"),
    ("heads", "H"),
    ("d_model", "d_model"),
    ("head_dim", "e"),
    ("depth", "D"),
    ("seq_len", "N"),
)


def _fixed(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(value) -> str | Text:
    """A ratio to two decimals; a Text already marked noisy (`_display_rows`) as it is."""
    return value if isinstance(value, Text) else _fixed(value, ".2f")


RATIOS = ("overhead", "vs_standard", "stream_vs_kv_cache")  # marked ~ when a baseline was noisy


def _backend_label(row: dict) -> Text:
    mechanism = row.get("mechanism") or "toroidal"
    label = Text(f"{mechanism} " if mechanism != "toroidal" else "")
    if mechanism != "toroidal" and row["backend"] == "-":
        label = Text(mechanism)
    elif row["backend"] == "auto" and row.get("chosen"):
        label.append_text(Text.assemble("auto", ("→" + row["chosen"], "dim")))
    else:
        label.append(row["backend"])
    if row.get("options"):
        label.append(f" {row['options']}", style="dim")
    if row.get("ring_world_size"):  # sequence-parallel rows: world size and layout
        label = Text.assemble(f"ring W={row['ring_world_size']}", (f" {row.get('chosen') or ''}", "dim"))
    return label


def _axis_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _axis_text(key: str, value) -> str:
    return "N" if key == "period" and value is None else _axis_value(value)  # period none means P = N


def varying_axes(rows: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """The axis columns whose values differ between rows, and 'name=value' for those that do not."""
    varying, fixed = [], []
    for key, header in _AXIS_COLUMNS:
        values = {_axis_text(key, row.get(key)) for row in rows}
        if len(values) > 1:
            varying.append((key, header))
        elif values:
            fixed.append(f"{header}={values.pop()}")
    return varying, fixed


def _axis_column(key: str, header: str) -> render.Column:
    return render.Column(key, header, format=lambda value: _axis_text(key, value), justify="right")


# --mode stream rows: median ms is the streaming step; these give the KV-cache step and memory.
def _kib(value) -> str:
    return _fixed(None if value is None else value / 1024, ",.1f")


STREAM_COLUMNS = [
    render.Column("kv_cache_ms", "KV-cache ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
    render.Column("stream_vs_kv_cache", "× KV", format=_ratio, justify="right"),
    render.Column("state_bytes", "state KiB", format=_kib, justify="right"),
    render.Column("kv_cache_bytes", "KV KiB", format=_kib, justify="right"),
    render.Column(
        "kv_cache_peak_memory_mb",
        "KV peak MiB",
        format=lambda v: _fixed(v, ",.1f"),
        justify="right",
    ),
]


def bench_columns(rows: list[dict]) -> tuple[list[render.Column], str]:
    """The columns the rows need, and the caption of the axes they share."""
    varying, fixed = varying_axes(rows)
    columns = [render.Column("backend_label", "backend", format=lambda v: v, no_wrap=True)]
    columns += [_axis_column(key, header) for key, header in varying]
    columns += [
        render.Column("status", "status"),
        render.Column("median_ms", "median ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
        render.Column("p10_p90", "p10–p90 ms", justify="right", no_wrap=True),
        render.Column("spread_cell", "spread", format=lambda v: v, justify="right", no_wrap=True),
        render.Column("tokens_per_s", "tokens/s", format=render.format_tokens_per_s, justify="right"),
        render.Column("tflops", "TFLOP/s", format=lambda v: _fixed(v, ".3g"), justify="right"),
        render.Column("peak_memory_mb", "peak MiB", format=lambda v: _fixed(v, ",.1f"), justify="right"),
        render.Column("overhead", "× SDPA(L)", format=_ratio, justify="right", no_wrap=True),
        render.Column("vs_standard", "× SDPA(N)", format=_ratio, justify="right", no_wrap=True),
    ]
    if any(row.get("mode") == "stream" for row in rows):
        columns += STREAM_COLUMNS
    if all(row.get("mode") == "stream" for row in rows):  # a decoding step has no FLOPs or SDPA baselines
        columns = [c for c in columns if c.key not in ("tflops", "overhead", "vs_standard")]
    if any(row.get("error") is not None for row in rows):
        error_format = lambda v: _fixed(v, ".2e")  # noqa: E731
        columns.append(render.Column("error", "rel. error", format=error_format, justify="right"))
    if any(row.get("gpu_util_pct") is not None for row in rows):
        columns += [
            render.Column("gpu_util_pct", "GPU %", format=lambda v: _fixed(v, ".0f"), justify="right"),
            render.Column("gpu_power_w", "W", format=lambda v: _fixed(v, ".0f"), justify="right"),
        ]
    if any(row.get("reason") for row in rows):
        columns.append(render.Column("reason", "reason", format=_short_reason, style="dim"))
    return columns, " · ".join(fixed)


def _short_reason(reason: str | None) -> str:
    """The reason without the "backend 'x' unavailable: " prefix the backend column already says."""
    if not reason:
        return ""
    head, sep, tail = reason.partition(" unavailable: ")
    return tail if sep and head.startswith("backend ") else reason


def _noisy(text: str) -> Text:
    return Text(f"{text} ~", style="bold yellow")


def _over(value, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value > threshold


def _stability_cells(row: dict, threshold: float | None) -> dict:
    """The spread in percent, marked `~` above `threshold`; the ratios marked when a baseline's was."""
    spread = row.get("spread")
    text = "-" if spread is None else f"{spread * 100:.1f}%"
    cells = {"spread_cell": _noisy(text) if _over(spread, threshold) else Text(text)}
    if _over(row.get("baseline_spread"), threshold):
        cells.update({key: _noisy(_fixed(row[key], ".2f")) for key in RATIOS if row.get(key) is not None})
    return cells


def noisy_line(rows: list[dict], threshold: float) -> str | None:
    """The line under the table that counts the noisy rows and says what to do, or None."""
    count = sum(bool(row.get("noisy")) for row in rows)
    if not count:
        return None
    were = "row was" if count == 1 else "rows were"
    return (
        f"{count} {were} noisy (spread > {threshold * 100:g}%, marked ~): "
        "rerun on a quieter machine or raise --max-time"
    )


def _display_rows(rows: list[dict], noisy: float | None) -> list[dict]:
    """Rows plus the cells computed from several fields: what auto chose, the p10-p90 range, the spread
    and the noisy marks."""
    shown = []
    for row in rows:
        p10_p90 = "-" if row.get("p10_ms") is None else f"{row['p10_ms']:.3f}–{row['p90_ms']:.3f}"
        cells = {"p10_p90": p10_p90, "backend_label": _backend_label(row), **_stability_cells(row, noisy)}
        shown.append({**row, **cells})
    return shown


def bench_table(rows: list[dict], title: str, noisy: float | None = None) -> Table:
    """The sweep table; with `noisy`, spreads above it are marked `~` (on the ratios for a baseline's)."""
    columns, caption = bench_columns(rows)
    table = render.table(_display_rows(rows, noisy), columns, title=title)
    table.caption = caption
    return table


# --- --compare -------------------------------------------------------------------------------------------

# The compared metrics, old value first, as `compare.table` draws them.
COMPARED = (
    compare.Shown(
        "median_ms", this="new ms", other="old ms", delta=None, change="Δ time", better=None,
        format=lambda v: _fixed(v, ".3f"), digits=1,
    ),
    compare.Shown(
        "peak_memory_mb", this="new MiB", other="old MiB", delta=None, change="Δ memory", better=None,
        format=lambda v: _fixed(v, ",.1f"), digits=1,
    ),
)  # fmt: skip


def comparison_table(rows: list[dict], old_path: Path, threshold: float | None) -> Table:
    """Matched `compare` rows of two bench results: the backend, the axes that vary, time and memory."""
    varying, fixed = varying_axes(rows) if rows else ([], [])
    keys = [render.Column("backend", "backend", no_wrap=True)]
    keys += [_axis_column(key, header) for key, header in varying]
    title = f"compared with {old_path}"
    return compare.table(rows, COMPARED, keys, title=title, caption=" · ".join(fixed), threshold=threshold)


# --- --tune -----------------------------------------------------------------------------------------------

# The columns of the --tune table: (row key, header, format).
TUNING_COLUMNS = (
    ("dtype", "dtype", None), ("queries", "Lq", None), ("keys", "Lk", None),
    ("causal", "causal", _axis_value), ("training", "training", _axis_value), ("backend", "fastest", None),
    ("tile", "tile", lambda v: _fixed(v, "d")), ("median_ms", "median ms", lambda v: _fixed(v, ".3f")),
    ("runner_up", "next (× time)", None), ("tried", "tried", None),
)  # fmt: skip


def tuning_table(measured, device: str) -> Table:
    """The winners of a measured tuning table (`toroidal.kernels.tuning_table.TuningTable`) per bucket."""
    rows = []
    for entry in measured.entries.values():
        ranked = sorted((ms, label) for label, ms in entry.measured.items() if ms is not None)
        runner_up = f"{ranked[1][1]} ×{ranked[1][0] / ranked[0][0]:.2f}" if len(ranked) > 1 else "-"
        rows.append({**entry.to_dict(), "runner_up": runner_up, "tried": len(ranked)})
    columns = [render.Column(key, header, format=fmt, justify="right") for key, header, fmt in TUNING_COLUMNS]
    return render.table(rows, columns, title=f"fastest backend per shape bucket on {device}")
