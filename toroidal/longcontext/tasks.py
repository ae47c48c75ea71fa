"""Task names: LongBench / SCROLLS short names to lm-eval's, and synthetic tasks at chosen lengths.

`resolve_tasks(LONGBENCH, ["narrativeqa", "passkey"], lengths=[1024])` gives
`longbench_narrativeqa` and `toroidal_passkey_1024`; templates live in configs/tasks/toroidal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from toroidal.runtime.install import config_folders, install_command
from toroidal.training.errors import SetupError


@dataclass(frozen=True)
class Suite:
    name: str  # longbench | scrolls
    prefix: str  # of lm-eval's task names
    tasks: tuple[str, ...]  # short names
    default: tuple[str, ...]  # what runs without --tasks
    title: str


# lm-eval 0.4.13's LongBench tasks (the _e variants are LongBench-E, length-balanced).
LONGBENCH_ENGLISH = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
LONGBENCH_CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
LONGBENCH_E = (
    "qasper_e",
    "multifieldqa_en_e",
    "hotpotqa_e",
    "2wikimqa_e",
    "gov_report_e",
    "multi_news_e",
    "trec_e",
    "triviaqa_e",
    "samsum_e",
    "passage_count_e",
    "passage_retrieval_en_e",
    "lcc_e",
    "repobench-p_e",
)
LONGBENCH = Suite(
    "longbench",
    "longbench_",
    LONGBENCH_ENGLISH + LONGBENCH_CHINESE + LONGBENCH_E,
    LONGBENCH_ENGLISH,
    "LongBench",
)
SCROLLS_TASKS = ("qasper", "quality", "narrativeqa", "contractnli", "govreport", "qmsum", "summscreenfd")
SCROLLS = Suite("scrolls", "scrolls_", SCROLLS_TASKS, SCROLLS_TASKS, "SCROLLS")
SUITES = {suite.name: suite for suite in (LONGBENCH, SCROLLS)}

# Synthetic task kind -> its template in configs/tasks/toroidal.
SYNTHETIC = {
    "passkey": "passkey_template_yaml",
    "passkey_ll": "passkey_ll_template_yaml",
    "needle": "needle_template_yaml",
    "needle_multikey": "needle_template_yaml",
}
# dataset_kwargs a kind adds to every variant (multikey: three distractor needles).
KIND_KWARGS = {"needle_multikey": {"needles": 4}}
SYNTHETIC_PREFIX = "toroidal_"
SHIPPED_LENGTHS = (1024, 2048, 4096, 8192)
NUM_DOCS = 100
TEMPLATE_FOLDER = "toroidal"
_VARIANT = re.compile(rf"(?:{SYNTHETIC_PREFIX})?({'|'.join(sorted(SYNTHETIC, key=len, reverse=True))})_(\d+)")


@dataclass(frozen=True)
class TaskRequest:
    name: str  # lm-eval's task (or group or tag) name
    kind: str | None = None  # synthetic kind
    length: int | None = None  # synthetic context length in tokens

    @property
    def synthetic(self) -> bool:
        return self.kind is not None


def variant_name(kind: str, length: int) -> str:
    return f"{SYNTHETIC_PREFIX}{kind}_{length}"


def resolve_tasks(
    suite: Suite, names: list[str] | None, lengths: list[int] | None = None
) -> list[TaskRequest]:
    """lm-eval task requests for `names` (None: the suite's default), in order, without duplicates."""
    if lengths is not None and any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise SetupError(f"lengths {lengths}: must be positive integers")
    requests: list[TaskRequest] = []
    for raw in names if names is not None else suite.default:
        name = raw.strip()
        kind = name.removeprefix(SYNTHETIC_PREFIX)
        variant = _VARIANT.fullmatch(name)
        if kind in SYNTHETIC:  # passkey or toroidal_passkey: one variant per length
            requests += [TaskRequest(variant_name(kind, n), kind, n) for n in lengths or SHIPPED_LENGTHS]
        elif variant:
            kind, length = variant.group(1), int(variant.group(2))
            requests.append(TaskRequest(variant_name(kind, length), kind, length))
        elif name in suite.tasks:
            requests.append(TaskRequest(suite.prefix + name))
        elif name:
            requests.append(TaskRequest(name))
    if not requests:
        raise SetupError("no tasks given", f"use e.g. --tasks {suite.default[0]},passkey")
    unique = list(dict.fromkeys(requests))
    if lengths is not None and not any(r.synthetic for r in unique):
        raise SetupError(
            "--lengths applies to the synthetic tasks, and none was asked for",
            f"add one of {', '.join(SYNTHETIC)} to --tasks, or drop --lengths",
        )
    return unique


# --- variant YAMLs ----------------------------------------------------------------------------------------


def template_folder() -> Path:
    for folder in config_folders("tasks"):  # ./configs/tasks first, then the shipped ones
        if (folder / TEMPLATE_FOLDER / SYNTHETIC["passkey"]).is_file():
            return (folder / TEMPLATE_FOLDER).resolve()
    raise SetupError(
        f"the synthetic task templates ({config_folders('tasks')[1] / TEMPLATE_FOLDER}) are not found",
        f"reinstall toroidal ({install_command()})",
    )


def variant_yaml(kind: str, length: int, include: str, tags: tuple[str, ...] = ()) -> str:
    """The YAML of one synthetic task variant (`include`: its template's path)."""
    lines = [f"include: {include}", f"task: {variant_name(kind, length)}"]
    if tags:
        lines.append(f"tag: [{', '.join(tags)}]")
    kwargs = {"context_tokens": length, "num_docs": NUM_DOCS, **KIND_KWARGS.get(kind, {})}
    lines += ["dataset_kwargs:"] + [f"  {key}: {value}" for key, value in kwargs.items()]
    return "\n".join(lines) + "\n"


def shipped_variant_tags(kind: str) -> tuple[str, ...]:
    """Tags of the shipped variants: each kind (toroidal_passkey, ...) and all (toroidal_longcontext)."""
    return (SYNTHETIC_PREFIX + kind, SYNTHETIC_PREFIX + "longcontext")


def write_variants(requests: list[TaskRequest], folder: Path) -> Path:
    """Write the YAML of every synthetic request into `folder` (an lm-eval include path)."""
    templates = template_folder()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for request in requests:
        if request.synthetic:
            include = str(templates / SYNTHETIC[request.kind])
            (folder / f"{request.name}.yaml").write_text(
                variant_yaml(request.kind, request.length, include), encoding="utf-8"
            )
    return folder
