"""One module per subcommand. Each has `HELP`, a `command` function whose parameters are its
options (or `app`, a Typer sub-app, for a command with subcommands), and optionally
`CONTEXT_SETTINGS`; `toroidal_cli.app` registers them in order (a sub-app uses the classes of
`toroidal_cli.help`). A command never imports another: what several share lives beside this
package (`run_options`, `sweep_options`, `compare`, ...). What imports torch is imported inside
the command function, never at the top: building the app and `--help` import no torch
(`tests/cli/test_startup.py`)."""
