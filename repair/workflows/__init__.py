"""The workflows a user runs, as plain functions; the CLI calls exactly these."""
