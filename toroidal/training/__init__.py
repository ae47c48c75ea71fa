"""Training and evaluating language models with toroidal attention (the work behind `toroidal train|eval`).

    from toroidal.training import TrainConfig, train, load_run, evaluate_lm

    result = train(TrainConfig(model="tiny", dataset="periodic", steps=100), "runs/demo")
    run = load_run("runs/demo")  # model (toroidal layers restored), tokenizer, config

Modules, one job each: config (TrainConfig), data (datasets and order), text_files (text and
code files), mechanism (the run's attention mechanism and its options), tokenization, models
(presets, toroidal layers, freezing), loading (a run or a model with a mechanism applied),
checkpoint (atomic training state), runs (the run folder), loop (training), evaluate
(metrics), attention_maps, distributed, loggers, hub, footprint (memory estimates before a run).
"""

from typing import TYPE_CHECKING

from toroidal.runtime.lazy import lazy_exports

# Imported on first use: `import toroidal.training.errors` (or the CLI) does not import torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TrainConfig": "toroidal.training.config",
        "CheckpointError": "toroidal.training.errors",
        "SetupError": "toroidal.training.errors",
        "ProgressEvent": "toroidal.training.loop",
        "TrainResult": "toroidal.training.loop",
        "train": "toroidal.training.loop",
        "Precision": "toroidal.training.metrics",
        "evaluate_lm": "toroidal.training.metrics",
        "TrainedRun": "toroidal.training.runs",
        "load_run": "toroidal.training.runs",
    },
)

if TYPE_CHECKING:
    from toroidal.training.config import TrainConfig
    from toroidal.training.errors import CheckpointError, SetupError
    from toroidal.training.loop import ProgressEvent, TrainResult, train
    from toroidal.training.metrics import Precision, evaluate_lm
    from toroidal.training.runs import TrainedRun, load_run

__all__ = [
    "CheckpointError",
    "Precision",
    "ProgressEvent",
    "SetupError",
    "TrainConfig",
    "TrainResult",
    "TrainedRun",
    "evaluate_lm",
    "load_run",
    "train",
]
