"""`toroidal longbench`: LongBench (or generated pass-key, needle) tasks in lm-eval, toroidal vs baseline.

Task names map to lm-eval's (narrativeqa -> longbench_narrativeqa); passkey, passkey_ll, needle
and needle_multikey are generated locally at `--lengths`. The options and the work are those of
every long-context suite: `toroidal_cli.longcontext_command`.
"""

from __future__ import annotations

from toroidal_cli.longcontext_command import make_command

HELP = (
    "Run LongBench tasks through lm-eval on a trained run (--checkpoint) or a model (--model); "
    "--both compares toroidal with baseline attention. passkey and needle tasks are generated "
    "locally at --lengths (no network)."
)

command = make_command("longbench")
