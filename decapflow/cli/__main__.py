"""``python -m decapflow.cli``: the same as the ``decapflow`` command."""

from decapflow.cli import main

main()
