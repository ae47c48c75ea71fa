"""Running a long-context suite: load every task first, then evaluate each model on each task.

`run(config, progress)` returns a `LongContextResult`: one row per (attention, task, metric,
filter), per-metric averages, and what lm-eval reported. Tasks run through lm-eval's `evaluate`.
"""

from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from toroidal.longcontext.tasks import SUITES, SYNTHETIC, TaskRequest, resolve_tasks, write_variants
from toroidal.training.errors import SetupError
from toroidal.training.hub import hub_unreachable_reason
from toroidal.training.loading import ModelSpec

RUNS = ("auto", "toroidal", "baseline")
OFFLINE_FIX = (
    "offline, pass --include-path DIR with task YAMLs that read local files "
    "(dataset_path: json, dataset_kwargs.data_files; see configs/tasks/README.md), "
    f"or run the generated tasks ({', '.join(SYNTHETIC)})"
)


@dataclass
class LongContextConfig:
    model: ModelSpec
    suite: str = "longbench"
    runs: tuple[str, ...] = ("auto",)  # the attention of each evaluation: auto, toroidal, baseline
    tasks: list[str] | None = None  # None: the suite's default
    lengths: list[int] | None = None  # synthetic tasks: context lengths in tokens
    limit: int | None = None  # samples per task
    max_length: int | None = None  # tokens the model sees; None: its positions
    batch_size: int = 1
    device: str = "auto"
    include_paths: list[str] = field(default_factory=list)
    log_samples: bool = False
    bootstrap_iters: int = 1000  # stderr of metrics that are not means

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise SetupError(f"unknown suite {self.suite!r}", f"use one of {', '.join(SUITES)}")
        if (
            not self.runs
            or any(run not in RUNS for run in self.runs)
            or len(set(self.runs)) != len(self.runs)
        ):
            raise SetupError(f"runs {self.runs}: give distinct values of {', '.join(RUNS)}")
        for name in ("limit", "max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SetupError(f"--{name.replace('_', '-')} {value}: must be >= 1")
        for path in self.include_paths:
            if not Path(path).is_dir():
                raise SetupError(f"--include-path {path} is not a folder", "pass a folder of task YAMLs")

    def to_dict(self) -> dict:
        return {**asdict(self), "model": asdict(self.model), "runs": list(self.runs)}


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # tasks (loading them) | model (building one) | task (evaluating one) | done
    attention: str | None = None
    task: str | None = None
    index: int = 0  # 1-based position of the task in this model's run
    total: int = 0


@dataclass
class LongContextResult:
    config: dict
    rows: list[dict]  # attention, task, metric, filter, value, stderr, samples, higher_is_better
    averages: list[dict]  # the same keys, task "average", plus "tasks" (how many were averaged)
    models: dict  # attention -> the model as evaluated (source, toroidal config, layers, ...)
    lm_eval: dict  # version, task versions, sample counts, n-shot
    timing: list[dict]  # attention, task, seconds
    samples: list[dict]  # lm-eval's per-sample records (log_samples), with attention and task
    device: torch.device

    def payload(self) -> dict:
        """The measured part of a result record."""
        return {
            "rows": self.rows,
            "averages": self.averages,
            "models": self.models,
            "lm_eval": self.lm_eval,
            "timing": self.timing,
        }


# --- tasks ----------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _metadata(spec: ModelSpec) -> dict:
    """What task generators need to know of the model (lm-eval passes task metadata to custom_dataset)."""
    if spec.checkpoint is not None:
        return {"checkpoint": str(spec.checkpoint)}
    return {"pretrained": spec.pretrained, "tokenizer": spec.tokenizer}


def _task_manager(include_paths: list[str], names: list[str], metadata: dict):
    """Only the given folders when they hold every task (fast), else lm-eval's own tasks too."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False, metadata=metadata)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=include_paths or None, metadata=metadata)


def _unknown_task(name: str, suite) -> SetupError:
    return SetupError(
        f"unknown task {name!r}: not a {suite.title} task, a generated task or an lm-eval task",
        f"use {suite.title} names ({', '.join(suite.default[:4])}, ...), {', '.join(SYNTHETIC)}, "
        "or pass --include-path for your own task YAMLs",
    )


def _load_one(manager, name: str, suite) -> dict:
    """{task name: Task} of one name (a group or tag gives several); errors become one SetupError."""
    if name not in manager.all_tasks:
        raise _unknown_task(name, suite)
    try:
        return manager.load([name])["tasks"]
    except SetupError:
        raise
    except Exception as error:  # datasets, the hub and task code raise many kinds: one line each
        reason = hub_unreachable_reason(timeout=2.0)
        if reason is not None:
            raise SetupError(
                f"cannot load task {name}: its dataset cannot be downloaded ({reason})", OFFLINE_FIX
            ) from None
        raise SetupError(f"cannot load task {name}: {_first_line(error)}", OFFLINE_FIX) from None


def load_tasks(manager, requests: list[TaskRequest], suite) -> dict:
    """Every requested task, loaded (data downloaded or generated), by lm-eval name, in order."""
    tasks: dict = {}
    for request in requests:
        for name, task in _load_one(manager, request.name, suite).items():
            tasks.setdefault(name, task)
    return tasks


def _check_lengths(requests: list[TaskRequest], tasks: dict, max_length: int) -> None:
    """A synthetic context must fit whole: lm-eval would cut its start (and maybe the key) silently."""
    for request in requests:
        if not request.synthetic:
            continue
        config = tasks[request.name].config
        generated = (config.generation_kwargs or {}).get("max_gen_toks", 0)
        generated = generated if config.output_type == "generate_until" else 0
        if request.length + generated > max_length:
            raise SetupError(
                f"task {request.name}: {request.length}-token contexts"
                + (f" plus {generated} generated tokens" if generated else "")
                + f" exceed the model's max length {max_length}",
                f"pass --max-length {request.length + generated} (rotary models extrapolate) "
                "or shorter --lengths",
            )


# --- results --------------------------------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def shape_rows(attention: str, results: dict) -> list[dict]:
    """lm-eval's `results` (metric,filter keys) as one row per (task, metric, filter)."""
    rows = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            rows.append(
                {
                    "attention": attention,
                    "task": task,
                    "metric": metric,
                    "filter": filter_name,
                    "value": _number(value),
                    "stderr": _number(metrics.get(f"{metric}_stderr,{filter_name}")),
                    "samples": samples,
                    "higher_is_better": better.get(metric),
                }
            )
    return rows


def average_rows(rows: list[dict]) -> list[dict]:
    """Per attention and metric, the mean over tasks (tasks without a value left out)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["value"] is not None:
            groups.setdefault((row["attention"], row["metric"], row["filter"]), []).append(row)
    return [
        {
            "attention": attention,
            "task": "average",
            "metric": metric,
            "filter": filter_name,
            "value": sum(r["value"] for r in group) / len(group),
            "stderr": None,
            "samples": sum(r["samples"] or 0 for r in group),
            "higher_is_better": group[0]["higher_is_better"],
            "tasks": len(group),
        }
        for (attention, metric, filter_name), group in groups.items()
    ]


def _lm_eval_info(outputs: list[dict], bootstrap_iters: int) -> dict:
    import lm_eval

    info = {"version": getattr(lm_eval, "__version__", None), "bootstrap_iters": bootstrap_iters}
    for key, name in (("versions", "task_versions"), ("n-samples", "n_samples"), ("n-shot", "n_shot")):
        info[name] = {task: value for out in outputs for task, value in out.get(key, {}).items()}
    return info


def write_samples(path: str | os.PathLike, samples: list[dict]) -> Path:
    """lm-eval's per-sample records as JSON lines, written to a temp name and renamed."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for sample in samples:
                out.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- running --------------------------------------------------------------------------------------------


def _evaluate(lm, task, manager, config: LongContextConfig) -> dict:
    """One task through `lm_eval.evaluator.evaluate`, prepared as `simple_evaluate` prepares it.

    Same seeds, num_fewshot 0 where the task sets none, and the few-shot seed reset, so results
    equal simple_evaluate's; its per-call environment report (`pip list`, `git describe`) is left
    out, since the result record states its environment itself.
    """
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    task_dict = manager.load([task])
    for task_obj in task_dict["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(
        lm=lm,
        task_dict=task_dict,
        limit=config.limit,
        bootstrap_iters=config.bootstrap_iters,
        log_samples=config.log_samples,
        fewshot_as_multiturn=True,  # simple_evaluate's default; it matters only with chat templates
    )


def _load(config: LongContextConfig, requests: list[TaskRequest], suite) -> tuple:
    """(task manager, {name: Task}): generated variants are written to a temporary include path."""
    with tempfile.TemporaryDirectory(prefix="toroidal-tasks-") as folder:
        generated = [write_variants(requests, folder)] if any(r.synthetic for r in requests) else []
        include = [str(path) for path in (*generated, *config.include_paths)]
        manager = _task_manager(include, [r.name for r in requests], _metadata(config.model))
        return manager, load_tasks(manager, requests, suite)  # built now: the files may go


def run(
    config: LongContextConfig, progress: Callable[[ProgressEvent], None] | None = None
) -> LongContextResult:
    """Evaluate the model of `config` once per entry of `config.runs` on every task. Raises SetupError."""
    from toroidal.integrations.lm_eval import build_lm

    notify = progress or (lambda event: None)
    suite = SUITES[config.suite]
    requests = resolve_tasks(suite, config.tasks, config.lengths)
    notify(ProgressEvent("tasks", total=len(requests)))
    manager, tasks = _load(config, requests, suite)

    rows, models, outputs, timing, samples, device = [], {}, [], [], [], torch.device("cpu")
    for run_attention in config.runs:
        notify(ProgressEvent("model", attention=run_attention))
        spec = replace(
            config.model, attention=run_attention, max_len=config.model.max_len or config.max_length
        )
        lm = build_lm(spec, device=config.device, batch_size=config.batch_size, max_length=config.max_length)
        attention, device = lm.loaded.attention, lm.device
        if attention in models:
            raise SetupError(f"the model runs {attention} attention twice", "drop --both for this model")
        _check_lengths(requests, tasks, lm.max_length)
        models[attention] = {**lm.loaded.describe(), "max_length": lm.max_length}
        for index, (name, task) in enumerate(tasks.items(), start=1):
            notify(ProgressEvent("task", attention, name, index, len(tasks)))
            start = time.perf_counter()
            out = _evaluate(lm, task, manager, config)
            timing.append({"attention": attention, "task": name, "seconds": time.perf_counter() - start})
            outputs.append(out)
            rows += shape_rows(attention, out)
            for task_name, records in out.get("samples", {}).items():
                samples += [{"attention": attention, "task": task_name, **record} for record in records]
        del lm
        gc.collect()
    notify(ProgressEvent("done"))
    return LongContextResult(
        config.to_dict(),
        rows,
        average_rows(rows),
        models,
        _lm_eval_info(outputs, config.bootstrap_iters),
        timing,
        samples,
        device,
    )
