"""The ``decapflow`` command line: a thin click shell over the library, one module per command family
(heavy imports happen inside commands)."""

from decapflow.cli import banks, captions, curate, decoders, maintain, serve  # noqa: F401  (registers the commands)
from decapflow.cli.base import main

__all__ = ["main"]
