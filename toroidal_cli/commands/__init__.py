"""One module per subcommand. Each has `HELP`, a `command` function whose parameters are its
options (or `app`, a Typer sub-app, for a command with subcommands), and optionally
`CONTEXT_SETTINGS`; `toroidal_cli.app` registers them in order. A command never imports another:
what several share lives beside this package (`run_options`, `sweep_options`, `compare`, ...)."""
