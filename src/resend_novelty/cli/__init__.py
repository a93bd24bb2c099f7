"""Command-line interface (``resend``): argparse lives here and nowhere else in the package."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
