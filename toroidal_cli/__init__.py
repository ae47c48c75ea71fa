"""toroidal_cli: the `toroidal` command line (Typer + Rich) over the `toroidal` library."""
