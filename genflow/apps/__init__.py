"""Command-line programs ("apps"), above the library: each runs as ``python -m genflow.apps.<name>``."""
