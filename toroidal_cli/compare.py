"""The one comparison table: this result against another, metric by metric, and the regression gate.

`compare` matches the rows of two results on their key fields and gives, per metric, this value,
the other's, the delta (this - other), the percent change, the better side and how much worse this
side is. `table` draws them for `bench`, `eval` and `longbench`/`scrolls` `--compare` (and
`longbench --both`); `gate` is `--fail-on-regression`. `text_mismatch` says when two results
scored different text (their `scored` blocks), which no comparison or gate should hide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from toroidal_cli import render

HIGHER, LOWER = 1, -1  # a metric's direction: which way is better


# --- matching rows -------------------------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _index(rows: list[dict], key_fields: tuple[str, ...], side: str) -> dict[tuple, dict]:
    index: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row.get(field) for field in key_fields)
        if key in index:
            raise ValueError(f"{side} rows have two rows with key {dict(zip(key_fields, key, strict=True))}")
        index[key] = row
    return index


def compare_rows(
    old: list[dict], new: list[dict], key_fields: list[str] | tuple[str, ...], metric_fields: list[str]
) -> list[dict]:
    """Match rows of two results by `key_fields` and give, per metric, old, new, delta and percent.

    Each returned row holds the key fields, `match` ("both", "old_only" or "new_only")
    and `metrics`: {metric: {"old", "new", "delta", "pct"}}. `delta` is new - old;
    `pct` is 100 * delta / |old| (None when old is 0 or a value is missing or not a number).
    Rows keep the order of `old`, then rows only in `new`.
    """
    key_fields = tuple(key_fields)
    old_index, new_index = _index(old, key_fields, "old"), _index(new, key_fields, "new")
    keys = list(old_index) + [key for key in new_index if key not in old_index]
    out = []
    for key in keys:
        before, after = old_index.get(key), new_index.get(key)
        match = (
            "both"
            if before is not None and after is not None
            else ("old_only" if after is None else "new_only")
        )
        metrics = {}
        for metric in metric_fields:
            a = _number(before.get(metric)) if before is not None else None
            b = _number(after.get(metric)) if after is not None else None
            delta = b - a if a is not None and b is not None else None
            pct = 100.0 * delta / abs(a) if delta is not None and a != 0 else None
            metrics[metric] = {"old": a, "new": b, "delta": delta, "pct": pct}
        out.append({**dict(zip(key_fields, key, strict=True)), "match": match, "metrics": metrics})
    return out


# --- this against the other ------------------------------------------------------------------------------


def better_side(
    delta: float | None, direction: int | None, this: str = "this", other: str = "other"
) -> str | None:
    """Which side is better given the metric's direction: `this`, `other`, "same", or None (no verdict)."""
    if delta is None or direction is None:
        return None
    if delta == 0:
        return "same"
    return this if delta * direction > 0 else other


def _no_direction(row: dict, metric: str) -> int | None:
    return None


def _not_gated(row: dict, metric: str) -> bool:
    return False


def compare(
    other_rows: list[dict],
    this_rows: list[dict],
    keys: Sequence[str],
    metrics: Sequence[str],
    *,
    direction: Callable[[dict, str], int | None] = _no_direction,
    gated: Callable[[dict, str], bool] = _not_gated,
    this: str = "this",
    other: str = "other",
) -> list[dict]:
    """Rows of `this_rows` against `other_rows`, matched on `keys` (a ValueError if a key repeats).

    Each row holds the key fields, `match` ("both", "old_only": only in the other result,
    "new_only": only in this one) and `metrics`: per metric {"this", "other", "delta", "pct",
    "better", "worse_pct", "gated"}. `direction(row, metric)` is HIGHER, LOWER or None (no
    verdict); `worse_pct` is the percent change in the worse direction (negative: better);
    `gated(row, metric)` says whether `gate` checks it. `this` and `other` name the sides in
    `better`.
    """
    out = []
    for row in compare_rows(other_rows, this_rows, keys, list(metrics)):
        changes = {}
        for metric in metrics:
            values, sign = row["metrics"][metric], direction(row, metric)
            pct = values["pct"]
            changes[metric] = {
                "this": values["new"],
                "other": values["old"],
                "delta": values["delta"],
                "pct": pct,
                "better": better_side(values["delta"], sign, this, other),
                "worse_pct": -pct * sign if sign and pct is not None else None,
                "gated": gated(row, metric),
            }
        out.append({**{key: row[key] for key in keys}, "match": row["match"], "metrics": changes})
    return out


# --- the gate -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regression:
    row: dict
    metric: str
    worse_pct: float


@dataclass(frozen=True)
class Verdict:
    """`--fail-on-regression`: the gated values worse than the threshold, and how many were compared."""

    regressions: list[Regression]
    compared: int  # gated values with a percent change

    @property
    def worst(self) -> Regression | None:
        return max(self.regressions, key=lambda found: found.worse_pct) if self.regressions else None


def gate(rows: list[dict], threshold: float) -> Verdict:
    """The gated values of `compare` rows that are worse than the other side's by more than `threshold` %."""
    regressions, compared = [], 0
    for row in rows:
        for metric, change in row["metrics"].items():
            if not change["gated"] or change["worse_pct"] is None:
                continue
            compared += 1
            if change["worse_pct"] > threshold:
                regressions.append(Regression(row, metric, change["worse_pct"]))
    return Verdict(regressions, compared)


# --- what was scored ------------------------------------------------------------------------------------


def recorded_scored(record: dict) -> dict | None:
    """A result's `scored` block (dataset, split, seq_len, tokens, fingerprint), None if it has none."""
    scored = record.get("scored")
    if not isinstance(scored, dict) or not isinstance(scored.get("fingerprint"), str):
        return None
    tokens = scored.get("tokens")
    return scored if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def scored_label(scored: dict) -> str:
    """'4,096 tokens of periodic test (seq_len 128, fingerprint 1a2b3c4d5e6f7a8b)'."""
    details = [f"seq_len {scored.get('seq_len')}"]
    if scored.get("fingerprint"):
        details.append(f"fingerprint {scored['fingerprint']}")
    where = f"{scored.get('dataset')} {scored.get('split')}"
    return f"{scored.get('tokens'):,} tokens of {where} ({', '.join(details)})"


def text_mismatch(this: dict, other: dict | None, other_name: str) -> str | None:
    """Why `this` scored block and the `other` (`recorded_scored`: None for a result that records
    none) are not the same text, or None when they are. A `this` block without a fingerprint yet
    (before scoring) is checked on its token count only."""
    if other is None:
        return f"{other_name} does not record the text it scored (an older toroidal eval wrote it)"
    same_tokens = this.get("tokens") == other["tokens"]
    if same_tokens and this.get("fingerprint") in (None, other["fingerprint"]):
        return None
    return f"{other_name} scored {scored_label(other)}, this run {scored_label(this)}"


# --- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """How one compared metric is drawn: its columns' headers (None: no such column) and value format."""

    metric: str
    this: str = "this"
    other: str = "other"
    delta: str | None = "delta"
    change: str = "change"
    better: str | None = "better"
    this_first: bool = False  # this side's column before the other's
    sides: tuple[str, str] = ("this", "other")  # the names `compare` gave the sides in `better`
    format: Callable[[object], str | Text] = render.format_number
    digits: int = 2  # of the percent change


def _pct_text(change: dict, digits: int, threshold: float | None) -> Text:
    """The percent change, red when this side is worse (by more than a gated threshold), green when better."""
    pct, worse = change["pct"], change["worse_pct"]
    if pct is None:
        return Text("-")
    limit = threshold if threshold is not None and change["gated"] else 0.0
    style = "" if worse is None else "red" if worse > limit else "green" if worse < 0 else ""
    return Text(f"{pct:+.{digits}f}%", style=style)


def _better_text(side: str | None, sides: tuple[str, str]) -> Text:
    styles = {sides[0]: "bold green", sides[1]: "bold red", "same": "dim"}
    return Text(side or "-", style=styles.get(side, ""))


def _columns(shown: Shown, threshold: float | None) -> list[render.Column]:
    """The columns of one shown metric; each cell reads that metric's change dict."""

    def column(part: str, header: str, format: Callable) -> render.Column:
        justify = "left" if part == "better" else "right"
        return render.Column(f"{shown.metric}.{part}", header, format=format, justify=justify)

    value = lambda part: lambda change: shown.format(change[part])  # noqa: E731
    sides = [column("other", shown.other, value("other")), column("this", shown.this, value("this"))]
    columns = sides[::-1] if shown.this_first else sides
    if shown.delta is not None:
        columns.append(column("delta", shown.delta, value("delta")))
    columns.append(column("change", shown.change, lambda change: _pct_text(change, shown.digits, threshold)))
    if shown.better is not None:
        columns.append(
            column("better", shown.better, lambda change: _better_text(change["better"], shown.sides))
        )
    return columns


def table(
    rows: list[dict],
    shown: Sequence[Shown],
    keys: Sequence[render.Column] = (),
    title: str | None = None,
    caption: str | Text | None = None,
    threshold: float | None = None,
) -> Table:
    """`compare` rows as a table: the `keys` columns, then each shown metric's columns.

    `threshold` (the gate's, when there is one) decides when a gated change is drawn red.
    """
    columns = list(keys) + [column for one in shown for column in _columns(one, threshold)]
    parts = ("other", "this", "delta", "change", "better")
    cells = [
        {**row, **{f"{one.metric}.{part}": row["metrics"][one.metric] for one in shown for part in parts}}
        for row in rows
    ]
    out = render.table(cells, columns, title=title)
    out.caption = caption
    return out
