"""``python -m repair.cli ARGS`` is ``mergetune ARGS``."""

from repair.cli.app import main

main()
