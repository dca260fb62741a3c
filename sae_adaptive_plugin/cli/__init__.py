"""The ``sae-adaptive`` command line (argument parsing only). Nothing in the package imports it."""

from sae_adaptive_plugin.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
