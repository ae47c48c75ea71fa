"""`toroidal scrolls`: SCROLLS tasks through lm-eval, toroidal vs baseline (`toroidal longbench` options).

Task names map to lm-eval's (quality -> scrolls_quality); the default is all seven. SCROLLS
scores with the dataset's own metric script, downloaded from the hub with the data. The options
and the work are those of every long-context suite: `toroidal_cli.longcontext_command`.
"""

from __future__ import annotations

from toroidal_cli.longcontext_command import make_command

HELP = (
    "Run SCROLLS tasks through lm-eval on a trained run (--checkpoint) or a model (--model); "
    "--both compares toroidal with baseline attention."
)

command = make_command("scrolls")
