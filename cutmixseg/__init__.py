"""What a training run executes below common.py, importing nothing of it (see common.py's docstring)."""
