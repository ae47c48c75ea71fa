"""Long-context evaluation through lm-eval: LongBench, SCROLLS and generated pass-key / needle tasks.

`run(LongContextConfig(model=ModelSpec(checkpoint="runs/pk"), tasks=["passkey"], lengths=[512]))`.
Importing needs neither lm-eval nor datasets; running does.
"""

from toroidal.longcontext.runner import LongContextConfig, LongContextResult, ProgressEvent, run
from toroidal.longcontext.tasks import LONGBENCH, SCROLLS, SUITES, resolve_tasks
from toroidal.training.loading import LoadedModel, ModelSpec, load_model

__all__ = [
    "LONGBENCH",
    "SCROLLS",
    "SUITES",
    "LoadedModel",
    "LongContextConfig",
    "LongContextResult",
    "ModelSpec",
    "ProgressEvent",
    "load_model",
    "resolve_tasks",
    "run",
]
