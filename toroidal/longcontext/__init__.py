"""Long-context evaluation through lm-eval: LongBench, SCROLLS and generated pass-key / needle tasks.

`run(LongContextConfig(model=ModelSpec(checkpoint="runs/pk"), tasks=["passkey"], lengths=[512]))`.
Importing needs neither lm-eval nor datasets; running does.
"""

from typing import TYPE_CHECKING

from toroidal.runtime.lazy import lazy_exports

# Imported on first use: the task tables (`toroidal.longcontext.tasks`) import no torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LongContextConfig": "toroidal.longcontext.runner",
        "LongContextResult": "toroidal.longcontext.runner",
        "ProgressEvent": "toroidal.longcontext.runner",
        "run": "toroidal.longcontext.runner",
        "LONGBENCH": "toroidal.longcontext.tasks",
        "SCROLLS": "toroidal.longcontext.tasks",
        "SUITES": "toroidal.longcontext.tasks",
        "resolve_tasks": "toroidal.longcontext.tasks",
        "LoadedModel": "toroidal.training.loading",
        "ModelSpec": "toroidal.training.loading",
        "load_model": "toroidal.training.loading",
    },
)

if TYPE_CHECKING:
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
