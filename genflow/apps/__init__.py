"""Command-line programs (apps) above the library: each is run as ``python -m genflow.apps.<name>``."""
