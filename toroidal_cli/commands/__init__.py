"""One module per subcommand. Each has `HELP`, a `command` function whose parameters are its
options, and optionally `CONTEXT_SETTINGS`; `toroidal_cli.app` registers them in order."""
