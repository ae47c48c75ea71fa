"""Long-context evaluation through lm-eval: LongBench, SCROLLS and generated pass-key / needle tasks.

    from toroidal.longcontext import LongContextConfig, ModelSpec, run

    result = run(LongContextConfig(model=ModelSpec(checkpoint="runs/pk"), tasks=["passkey"],
                                   lengths=[256, 512], runs=("baseline", "toroidal")))

Modules, one job each: sources (the model: a run folder or a causal LM, with or without
toroidal attention), tasks (suite names to lm-eval tasks, synthetic variants), synthetic
(the generated documents), runner (loading tasks, evaluating, result rows). The lm-eval
model wrapper is `toroidal.integrations.lm_eval`. Importing this package needs neither
lm-eval nor datasets; running does.
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
