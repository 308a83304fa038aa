"""`python -m pipeline ...` = the `deltaedit` command (where the script is not on PATH)."""

from pipeline.cli import main

main()
