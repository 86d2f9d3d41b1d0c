"""Command line: `mergetune` (see app.py); one module per command group, imported on use."""
