"""Write the summary.md of a results/ folder from its result JSONs (nothing in it is typed by hand).

    python results/summarize.py bench-cpu results/bench-cpu > results/bench-cpu/summary.md
    python results/summarize.py extrapolation results/extrapolation > results/extrapolation/summary.md
    python results/summarize.py real-model results/real-model > results/real-model/summary.md

Only the standard library: it reads the JSONs that `toroidal bench`, `toroidal eval`,
`toroidal train` and `toroidal longbench` write.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine(result: dict) -> str:
    env = result.get("env", {})
    return f"{env.get('device_name')} ({env.get('cpu_count')} cores, torch {env.get('torch')})"


# --- bench-cpu ---------------------------------------------------------------------------------------


def bench_cpu(folder: Path) -> str:
    result = read(folder / "cpu-scaling.json")
    config = result["config"]
    lengths = sorted({row["seq_len"] for row in result["rows"]})
    backends = list(dict.fromkeys(row["backend"] for row in result["rows"]))
    cells: dict = {}
    for row in result["rows"]:
        if row["status"] != "ok":
            text = row["status"]
        else:
            noisy = " (noisy)" if row.get("noisy") else ""
            text = (
                f"{row['median_ms']:.1f} ms, {row['vs_standard']:.2f}x, {row['overhead']:.2f}x floor, "
                f"{row['tflops'] * 1e3:.1f} GFLOP/s{noisy}"
            )
        cells[row["backend"], row["seq_len"]] = text
    rows = [[backend] + [cells.get((backend, n), "-") for n in lengths] for backend in backends]
    summary = result["summary"]
    return (
        "\n\n".join(
            [
                "# CPU scaling of the toroidal backends",
                f"`toroidal bench --config cpu-scaling` on {machine(result)}, {result['created']}: "
                f"depth {config['depth'][0]}, {config['heads'][0]} heads, d_model {config['d_model'][0]}, "
                f"batch {config['batch'][0]}, {config['dtype'][0]}, mode {config['mode'][0]}, causal.",
                "Each cell: median time of one call; its ratio to plain causal SDPA over the same N "
                "tokens, timed in the same run (`vs_standard`); its ratio to the floor, plain SDPA over "
                "the N x D tokens of the torus (`overhead`, same run); achieved GFLOP/s of the torus "
                "attention. "
                "Rows marked noisy had a spread (IQR / median) above the sweep's threshold.",
                table(["backend"] + [f"N = {n}" for n in lengths], rows),
                f"{summary['ok']} rows measured, {summary['skipped']} skipped (over the memory budget), "
                f"{summary['oom']} out of memory, {summary['error']} errors; {summary['noisy']} noisy; "
                f"load average at the start {summary.get('load_average', 0):.2f}; "
                f"{summary['seconds']:.0f} s.",
                "Plot: `cpu-scaling.png`. Reproduce: `bash results/bench-cpu/run.sh`.",
            ]
        )
        + "\n"
    )


# --- extrapolation -----------------------------------------------------------------------------------


def length_rows(result: dict) -> dict[int, dict]:
    """seq_len -> metrics of an eval result, with one length or several."""
    if "rows" in result:
        return {row["seq_len"]: row["metrics"] for row in result["rows"]}
    return {result["scored"]["seq_len"]: result["metrics"]}


def spread_text(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def extrapolation(folder: Path) -> str:
    arms: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*-seed*.json")):
        arms[path.stem.rsplit("-seed", 1)[0]].append(read(path))
    trained = {r["summary"]["training_seq_len"] for results in arms.values() for r in results}
    (train_len,) = trained
    lengths = sorted({n for results in arms.values() for r in results for n in length_rows(r)})
    header = (
        ["arm", "seeds"] + [f"{n} ({n // train_len}x)" for n in lengths] + [f"{lengths[-1]} / {train_len}"]
    )
    rows = []
    for arm, results in sorted(arms.items()):
        per_length = [
            [length_rows(r)[n]["perplexity"] for r in results if n in length_rows(r)] for n in lengths
        ]
        growth = [
            length_rows(r)[lengths[-1]]["perplexity"] / length_rows(r)[train_len]["perplexity"]
            for r in results
            if lengths[-1] in length_rows(r) and train_len in length_rows(r)
        ]
        cells = [spread_text(values) if values else "-" for values in (*per_length, growth)]
        rows.append([arm, str(len(results)), *cells])
    first = next(iter(arms.values()))[0]
    scored = first["rows"][0]["scored"]
    parts = [
        "# Length extrapolation",
        f"Tiny Llama-family models trained from scratch at {train_len} byte tokens on WikiText-2 "
        f"valid.txt (equal steps, tokens and seeds per arm), scored on the first "
        f"{scored['tokens']:,} tokens of {Path(scored['dataset'].split(':', 1)[1]).name} at each "
        f"length (the same text at every length). {machine(first)}.",
        "Perplexity, mean ± standard deviation over the seeds; the last column is perplexity at the "
        "longest length over perplexity at the training length (1.00: no loss of quality).",
        table(header, rows),
    ]
    parts.append("Plot: `extrapolation.png`. Reproduce: `bash results/extrapolation/run.sh`.")
    return "\n\n".join(parts) + "\n"


# --- real-model --------------------------------------------------------------------------------------


def retrieval_rows(result: dict) -> dict[tuple[str, int], float]:
    """(task, context length) -> exact-match accuracy of a longbench result's passkey and needle tasks."""
    found = {}
    for row in result["rows"]:
        kind, _, length = row["task"].removeprefix("toroidal_").rpartition("_")
        if kind in ("passkey", "needle") and row["metric"] == "exact_match":
            found[kind, int(length)] = row["value"]
    return found


def real_model(folder: Path) -> str:
    arms = [p.stem.removeprefix("eval-") for p in folder.glob("eval-*.json")]
    # base first, then each trained set of layers: toroidal beside its standard-attention control
    arms = sorted(
        (n for n in arms if n != "base"), key=lambda n: (n.partition("-")[2], not n.startswith("toroidal"))
    )
    names = [n for n in ["base", *arms] if (folder / f"eval-{n}.json").is_file()]
    evals = {n: read(folder / f"eval-{n}.json") for n in names}
    lengths = sorted({n for r in evals.values() for n in length_rows(r)})
    longbench = {
        n: read(folder / f"longbench-{n}.json") for n in names if (folder / f"longbench-{n}.json").is_file()
    }
    retrieval = {n: retrieval_rows(result) for n, result in longbench.items()}
    # passkey columns first, then needle, each by length
    tasks = sorted({key for r in retrieval.values() for key in r}, key=lambda k: (k[0] != "passkey", k[1]))
    header = ["arm", "trained layers", "trainable params", "train time (s)"]
    header += [f"ppl @ {n}" for n in lengths] + [f"{kind} @ {n}" for kind, n in tasks]
    rows = []
    for name in names:
        train = folder / f"train-{name}.json"
        if train.is_file():
            record = read(train)
            trained = [
                ",".join(map(str, record["config"]["layers"] or [])) or "all",
                f"{record['model']['trainable_parameters']:,}",
                f"{record['timing']['wall_time_s']:.0f}",
            ]
        else:
            trained = ["none", "0", "-"]
        ppl = [f"{length_rows(evals[name])[n]['perplexity']:.2f}" for n in lengths]
        found = retrieval.get(name, {})
        keys = [f"{found[key]:.0%}" if key in found else "-" for key in tasks]
        rows.append([name] + trained + ppl + keys)
    base = evals["base"]
    scored = base["rows"][0]["scored"] if "rows" in base else base["scored"]
    budget = ""
    some_train = next(iter(sorted(folder.glob("train-*.json"))), None)
    if some_train is not None:
        record = read(some_train)
        config = record["config"]
        budget = (
            f"Fine-tuning: {config['steps']} steps x {config['batch_size']} samples x {config['seq_len']} "
            f"tokens = {record['final']['tokens']:,} tokens of WikiText-2 valid.txt, "
            f"AdamW lr {config['lr']}, "
            f"seed {config['seed']}; only the attention of the trained layers learns (--freeze-base). "
        )
    retrieval_note = ""
    if retrieval:
        samples = {row["samples"] for result in longbench.values() for row in result["rows"]}
        retrieval_note = (
            "Passkey and needle retrieval (`toroidal longbench`): exact-match accuracy over "
            f"{max(samples)} generated samples per task and length."
        )
    versus = []
    for name in names:
        control = name.replace("toroidal-", "standard-", 1)
        if name.startswith("toroidal-") and control in evals:
            deltas = [
                length_rows(evals[name])[n]["perplexity"] / length_rows(evals[control])[n]["perplexity"] - 1
                for n in lengths
            ]
            versus.append(
                f"{name} vs {control}: "
                + ", ".join(f"{d:+.1%} @ {n}" for d, n in zip(deltas, lengths, strict=True))
            )
    parts = [
        "# A real pretrained model: SmolLM2-135M",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), {machine(base)}. " + budget,
        f"Perplexity on the first {scored['tokens']:,} tokens of WikiText-2 test.txt at each length "
        "(the same text at every length). " + retrieval_note,
        table(header, rows),
        *(
            ["Perplexity of each toroidal arm relative to its control (negative: toroidal is better):"]
            if versus
            else []
        ),
        *(f"- {line}" for line in versus),
        "Reproduce: `bash results/real-model/run.sh`.",
    ]
    return "\n\n".join(parts) + "\n"


MAKERS = {"bench-cpu": bench_cpu, "extrapolation": extrapolation, "real-model": real_model}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MAKERS:
        print(f"usage: summarize.py {{{','.join(MAKERS)}}} FOLDER", file=sys.stderr)
        return 2
    sys.stdout.write(MAKERS[argv[0]](Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
