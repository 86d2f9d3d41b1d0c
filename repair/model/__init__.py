"""The frozen backbone: loading it and prompt-aware text encoding."""
