"""`python -m clipsearch` is the `clipsearch` command."""

from clipsearch.cli import main

main()
