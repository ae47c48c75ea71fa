"""Eval results at several window lengths (length extrapolation): parsing, rows, the table.

`parse_lengths` reads `--seq-len 128,256,512`. `result_rows` reads either shape of a
`toroidal eval --out` result as rows per length: one length (`metrics` + `scored`) or several
(`rows`, with `summary`: the run's training length, the model's positions, whether every length
scored the same text). `table` draws this run's rows, marking the training length and the
lengths past the model's positions. The comparison goes through `toroidal_cli.compare`.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

from toroidal_cli import render
from toroidal_cli.errors import UserError
from toroidal_cli.values import parse_int, split_items

# The metrics of a length's row in the table, in order (a metric no row has is left out).
TABLE_METRICS = (
    ("perplexity", "perplexity"),
    ("bits_per_byte", "bits/byte"),
    ("loss", "loss"),
    ("passkey_accuracy", "passkey acc"),
    ("tokens", "tokens"),
    ("tokens_per_s", "tokens/s"),
    ("seconds", "seconds"),
    ("peak_memory_mb", "peak MiB"),
)
BEYOND = "†"  # marks a length past the model's stated positions


def parse_lengths(value, where: str = "--seq-len") -> tuple[int, list[int] | None]:
    """(seq_len, lengths): '512' -> (512, None); '128,256' or a YAML list -> (128, [128, 256]).

    Several lengths come back sorted; the shortest is `seq_len`. A length given twice is an error.
    """
    items = split_items(value)
    if not items:
        raise UserError(f"{where}: {value!r} is not a length", "give a length such as 512, or 128,256,512")
    numbers = [parse_int(item, where) for item in items]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        raise UserError(f"{where} {twice[0]} is given twice", "list each length once")
    if len(numbers) == 1:
        return numbers[0], None
    return min(numbers), sorted(numbers)


def lcm(numbers: list[int]) -> int:
    out = 1
    for number in numbers:
        out = out * number // math.gcd(out, number)
    return out


# --- reading results --------------------------------------------------------------------------------------


def _is_row(row) -> bool:
    if not isinstance(row, dict) or isinstance(row.get("seq_len"), bool):
        return False
    return isinstance(row.get("seq_len"), int) and isinstance(row.get("metrics"), dict)


def is_multi(record: dict) -> bool:
    """Whether an eval result holds several lengths (`rows`)."""
    return isinstance(record.get("rows"), list)


def result_rows(record: dict, name: str) -> list[dict]:
    """The rows per length of an eval result (`name` for errors): {seq_len, metrics, scored, ...}.

    A one-length result is one row at the length it scored (its `scored` block, else its config).
    """
    fix = "pass a file written by `toroidal eval --out`"
    if is_multi(record):
        rows = record["rows"]
        if not rows or not all(_is_row(row) for row in rows):
            raise UserError(f"{name} has malformed 'rows' (each needs seq_len and metrics)", fix)
        return rows
    if not isinstance(record.get("metrics"), dict):
        raise UserError(f"{name} has no 'metrics'", fix)
    scored = record.get("scored") if isinstance(record.get("scored"), dict) else {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    seq_len = scored.get("seq_len", config.get("seq_len"))
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
        raise UserError(f"{name} does not say which --seq-len it scored", fix)
    return [{"seq_len": seq_len, "metrics": record["metrics"], "scored": record.get("scored")}]


def summary(record: dict) -> dict:
    """A result's summary (training_seq_len, model_positions, same_text); {} for a one-length result."""
    found = record.get("summary")
    return found if isinstance(found, dict) else {}


def row_at(rows: list[dict], seq_len: int) -> dict | None:
    return next((row for row in rows if row["seq_len"] == seq_len), None)


def as_one_length(record: dict, seq_len: int, name: str) -> dict:
    """A several-length result as the one-length result of its row at `seq_len` (for a one-length
    `--compare`); a one-length result as it is. UserError when it has no such row."""
    if not is_multi(record):
        return record
    rows = result_rows(record, name)
    row = row_at(rows, seq_len)
    if row is None:
        scored = ", ".join(str(r["seq_len"]) for r in rows)
        raise UserError(
            f"{name} has no row at --seq-len {seq_len} (it scored {scored})",
            "evaluate at one of its lengths, or give --seq-len several lengths",
        )
    return {**record, "metrics": row["metrics"], "scored": row.get("scored")}


# --- the table ----------------------------------------------------------------------------------------------


def _times(length: int, trained: int | None) -> str:
    if trained is None:
        return "-"
    if length == trained:
        return "trained"
    ratio = length / trained
    return f"×{ratio:g}" if ratio >= 1 else f"×{ratio:.3g}"


def length_label(length: int, positions: int | None) -> str:
    """'2048†' past the model's stated positions, else '2048'."""
    return f"{length}{BEYOND}" if positions is not None and length > positions else str(length)


def _as_is(text: Text) -> Text:
    return text


def table(rows: list[dict], info: dict) -> Table:
    """A row per length: its metrics; `× train` against the run's training length (when known)."""
    trained, positions = info.get("training_seq_len"), info.get("model_positions")
    metrics = [row["metrics"] for row in rows]
    shown = [(key, header) for key, header in TABLE_METRICS if any(m.get(key) is not None for m in metrics)]
    if not any(m.get("bits_per_byte") is not None for m in metrics):  # a tokenizer without bytes
        shown.insert(1, ("bits_per_token", "bits/token"))
    columns = [render.Column("length", justify="right", no_wrap=True, format=_as_is)]
    if trained is not None:
        columns.append(render.Column("times", "× train", justify="right", no_wrap=True, format=_as_is))
    for key, header in shown:
        format = render.format_tokens_per_s if key == "tokens_per_s" else None
        columns.append(render.Column(key, header, format=format, justify="right"))
    cells = []
    for row in rows:
        length = row["seq_len"]
        style = "bold" if length == trained else ""
        label, times = Text(length_label(length, positions), style), Text(_times(length, trained), style)
        cells.append({**row["metrics"], "length": label, "times": times})
    return render.table(cells, columns)


def notes(rows: list[dict], info: dict, max_tokens: int | None) -> list[str]:
    """Lines under the table: the training length, lengths past the positions, what text was scored."""
    trained, positions = info.get("training_seq_len"), info.get("model_positions")
    lines = []
    if trained is not None:
        lines.append(f"trained at seq_len {trained} (the run's train config); × train: length / {trained}")
    beyond = [row["seq_len"] for row in rows if positions is not None and row["seq_len"] > positions]
    if beyond:
        lines.append(
            f"{BEYOND} past the model's {positions} stated positions (max_position_embeddings): "
            "its position scheme computes them"
        )
    scored = rows[0].get("scored") or {}
    where = f"{scored.get('dataset')} {scored.get('split')}"
    if info.get("same_text") is None:
        lines.append(f"scored: samples of {where} generated at each length (synthetic data)")
    elif info["same_text"]:
        tokens = rows[0]["metrics"].get("tokens")
        lines.append(
            f"scored: the same {tokens:,} tokens of {where} at every length, from its first token "
            "(fingerprints per length in the JSON)"
        )
    else:
        counts = ", ".join(f"{row['metrics'].get('tokens'):,} at {row['seq_len']}" for row in rows)
        line = f"note: the lengths scored different amounts of {where} ({counts})"
        exhausted = any((row["metrics"].get("tokens") or 0) < (max_tokens or 0) for row in rows)
        if max_tokens is None:
            line += ": all of it, each length leaving out its tail shorter than one window"
        elif not exhausted:
            step = lcm([row["seq_len"] for row in rows])
            budget = math.ceil(max_tokens / step) * step
            line += (
                f": a length that does not divide --max-tokens {max_tokens:,} scores a last window past it; "
                f"--max-tokens {budget} scores the same tokens at every length"
            )
        else:
            line += (
                f": it has fewer than --max-tokens {max_tokens:,} tokens, and each length leaves out its "
                "tail shorter than one window"
            )
        lines.append(line)
    return lines
