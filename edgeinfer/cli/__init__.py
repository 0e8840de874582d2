"""The ``edgeinfer`` command line (edgeinfer.cli.main); encoder-decoder runs in edgeinfer.cli.seq2seq."""

from .main import main

__all__ = ["main"]
