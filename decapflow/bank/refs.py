"""Bank references: ``NAME`` (the newest version), ``NAME@TAG`` (the version a tag pins, followed when the tag moves)
and ``NAME@vN`` (version N, fixed).

Every reader takes a reference (``caption --memory coco@prod``, the API's ``memory`` field, ``eval``, ``train
--memory coco@v12``); writers take a plain name and refuse the others (:func:`writable`), since a pinned version is
read-only. Tags are plain names: a letter first, then letters, digits, ``-`` or ``_`` (``v12`` would read as a
version, so tags may not look like one). Tags starting with ``_`` are decapflow's own (a clone's pin on the
version it shares files with, :data:`CLONE_PIN`) and never taken from users.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from decapflow.errors import BankError, UnknownVersion

__all__ = ["BankRef", "CLONE_PIN", "check_tag", "checkout_version", "clone_pin", "latest_version", "spans", "writable"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a bank name (see memory.check_name)
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^v(\d+)$")
#: Prefix of the tag a shallow clone keeps on its source's version (``_clone-NEW``): the files it shares.
CLONE_PIN = "_clone-"


def check_tag(tag: str) -> str:
    """A user's tag name, checked: a letter, then up to 63 letters, digits, '-' or '_'; not ``v`` + digits."""
    if not _TAG.match(tag or "") or _VERSION.match(tag):
        raise BankError(f"invalid tag {tag!r}: use a plain name (a letter, then letters, digits, '-' or '_'; "
                        f"not 'v' followed by digits, which reads as a version)")
    return tag


def clone_pin(clone: str) -> str:
    """The tag that pins, on a clone's source, the version the clone ``clone`` shares files with."""
    return f"{CLONE_PIN}{clone}"


@dataclass(frozen=True)
class BankRef:
    """A parsed reference: ``name`` plus at most one of ``tag`` and ``version``."""

    name: str
    tag: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str | BankRef) -> BankRef:
        if isinstance(text, BankRef):
            return text
        name, at, pin = str(text or "").partition("@")
        if not _NAME.match(name):
            raise BankError(f"invalid bank name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a "
                            f"letter or digit")
        if not at:
            return cls(name)
        if (match := _VERSION.match(pin)) is not None:
            return cls(name, version=int(match.group(1)))
        if pin.startswith("_") or not _TAG.match(pin):
            raise BankError(f"invalid bank reference {text!r}: after '@' give a tag (a plain name) or a version "
                            f"(v12), e.g. {name}@prod or {name}@v12")
        return cls(name, tag=pin)

    @property
    def pinned(self) -> bool:
        return self.tag is not None or self.version is not None

    def __str__(self) -> str:
        if self.tag is not None:
            return f"{self.name}@{self.tag}"
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        return self.name


def writable(ref: str, command: str = "this command") -> str:
    """The plain bank name of ``ref``, refusing a pinned reference: writers change the newest version only."""
    parsed = BankRef.parse(ref)
    if parsed.pinned:
        raise BankError(f"{command} writes to the newest version of a bank, and {str(parsed)!r} pins a version "
                        f"(read-only): give {parsed.name!r}")
    return parsed.name


def latest_version(table: Any) -> int:
    """Move ``table`` to its newest version and return it."""
    table.checkout_latest()
    return int(table.version)


def checkout_version(table: Any, name: str, version: int) -> None:
    """Check ``table`` out at ``version``; :class:`UnknownVersion` (listing the versions kept) when it is gone."""
    try:
        table.checkout(version)
    except ValueError:
        table.checkout_latest()
        kept = [int(v["version"]) for v in table.list_versions()]
        raise UnknownVersion(f"bank {name!r} has no version {version} (versions kept: {spans(kept)}; older ones "
                             f"were removed by 'decapflow memory maintain' unless tagged)") from None


def spans(versions: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"``."""
    out: list[str] = []
    for v in sorted(versions):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out) or "none"
