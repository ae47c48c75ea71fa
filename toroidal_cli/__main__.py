"""`python -m toroidal_cli` runs the `toroidal` command."""

from toroidal_cli.app import main

main()
