"""The exceptions a caller of the library may want to tell apart (a server maps each to an HTTP status).

They live here, free of heavy imports, and are re-exported by the modules that raise them."""

from __future__ import annotations


class BankError(ValueError):
    """A memory-bank operation cannot be done as asked (bad name, missing bank, encoder mismatch...)."""


class UnknownBank(BankError):
    """No bank of that name exists in the store."""


class UnknownVersion(UnknownBank):
    """The bank exists, but not the version or tag asked for (``BANK@v12``, ``BANK@prod``)."""


class UnknownDecoder(ValueError):
    """No registered decoder has that id."""


class NoDecoder(ValueError):
    """The bank has no current decoder yet."""


class EncoderUnavailable(RuntimeError):
    """The encoder spec is malformed or its weights cannot be loaded (offline, missing file, unknown name)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: retrying the same recipe would diverge again."""
