"""Each bank's fixed evaluation sets, recorded in the store's ``_evalsets`` table (the gate scores decoders on them).

Every bank gets a **text** evaluation set the first time a decoder is trained or gated for it: the
``min(500, rows/20)`` bank sentences with the smallest content hashes (hashes are uniform, so this is a fixed
random sample), which training leaves out. It is never changed, except that sentences removed from the bank leave
it (:func:`drop_eval_sentences`, under a new id, so no score on the old set is compared with one on the new). A bank
too small to spare 10 rows scores on up to 100 of its sentences *without* holding them out (``held_out: false``).

An **image** set (``decapflow memory eval-set BANK --annotations COCO.json --images DIR``) is copied into the store
(``_evalsets/<bank>/<id>/``); a **domain** set keeps the embeddings of the unlabelled images behind
``decapflow memory image-mean`` (at most :data:`MAX_DOMAIN`). See :mod:`decapflow.lifecycle.gate` for how each is
scored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from decapflow.bank.memory import MemoryBank
from decapflow.bank.store import Store, get_store
from decapflow.decoder.registry import utc_now
from decapflow.errors import BankError

__all__ = ["EvalSet", "add_domain_eval_set", "add_image_eval_set", "drop_eval_sentences", "drop_eval_sets",
           "eval_sets", "find_eval_set", "held_out_texts", "text_eval_set"]

MAX_TEXT = 500  # held-out sentences per bank at most
MIN_HELD_OUT = 10  # fewer than this to spare: score on training sentences instead
MAX_DOMAIN = 300  # unlabelled domain images kept for the gate
SCHEMA = pa.schema([
    ("bank", pa.string()), ("id", pa.string()), ("kind", pa.string()), ("created", pa.string()),
    ("bank_version", pa.int64()), ("held_out", pa.bool_()), ("hashes", pa.list_(pa.string())),
    ("texts", pa.list_(pa.string())), ("info", pa.string()),
])


@dataclass(frozen=True)
class EvalSet:
    bank: str
    id: str
    kind: str  # "text" | "images" | "domain"
    created: str
    bank_version: int
    held_out: bool
    hashes: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "created": self.created, "bank_version": self.bank_version,
                "held_out": self.held_out, "size": len(self.hashes) or self.info.get("images", 0),
                **{k: v for k, v in self.info.items() if k != "images"}}


def _table(store: Store) -> Any:
    return store.table("_evalsets", SCHEMA)


def eval_sets(bank: str, store: Store | str | None = None) -> list[EvalSet]:
    """The evaluation sets recorded for ``bank``, oldest first."""
    table = _table(get_store(store))
    table.checkout_latest()
    rows = table.search().where(f"bank = '{bank}'").limit(None).to_list()
    return [EvalSet(r["bank"], r["id"], r["kind"], r["created"], r["bank_version"], r["held_out"], r["hashes"] or [],
                    r["texts"] or [], json.loads(r["info"] or "{}")) for r in sorted(rows, key=lambda r: r["created"])]


def find_eval_set(bank: str, kind: str, store: Store) -> EvalSet | None:
    """``bank``'s newest evaluation set of ``kind`` (text, images, domain), or None."""
    found = [s for s in eval_sets(bank, store) if s.kind == kind]
    return found[-1] if found else None


def _record(store: Store, evalset: EvalSet) -> EvalSet:
    row = {**asdict(evalset), "info": json.dumps(evalset.info)}
    _table(store).add(pa.Table.from_pylist([row], schema=SCHEMA))
    return evalset


def rows_by_hash(bank: MemoryBank, hashes: list[str], columns: list[str]) -> list[list[Any]]:
    """``columns`` of the rows of ``bank`` whose hash is in ``hashes``, as lists (in the bank's order)."""
    quoted = ", ".join(f"'{h}'" for h in hashes)
    table = bank.table.search().where(f"hash IN ({quoted})").select(columns).limit(None).to_arrow()
    return [table.column(c).to_pylist() for c in columns]


def text_eval_set(bank: MemoryBank, store: Store | str | None = None, create: bool = True) -> EvalSet | None:
    """``bank``'s text evaluation set, chosen and recorded on first use (see the module docstring)."""
    store = get_store(store)
    if (found := find_eval_set(bank.name, "text", store)) is not None or not create:
        return found
    with store.lock(f"evalset-{bank.name}"):
        if (found := find_eval_set(bank.name, "text", store)) is not None:
            return found
        hashes = sorted(bank.hashes())
        n = min(MAX_TEXT, len(hashes) // 20)
        held_out = n >= MIN_HELD_OUT
        chosen = hashes[:n] if held_out else hashes[: min(len(hashes), 100)]
        if not chosen:
            raise BankError(f"bank {bank.name!r} is empty: nothing to evaluate decoders on")
        texts = dict(zip(*rows_by_hash(bank, chosen, ["hash", "text"]), strict=True))
        return _record(store, EvalSet(bank.name, f"text-{len(chosen)}-v{bank.version}", "text", utc_now(),
                                      bank.version, held_out, chosen, [texts[h] for h in chosen]))


def held_out_texts(bank: str, store: Store | str | None = None) -> set[str]:
    """Sentences training must leave out: the text evaluation set's, when it holds them out."""
    evalset = find_eval_set(bank, "text", get_store(store))
    return set(evalset.texts) if evalset is not None and evalset.held_out else set()


def add_image_eval_set(bank: MemoryBank, annotations: Path, images: Path, store: Store | str | None = None,
                       split: str | None = None) -> EvalSet:
    """Register an annotated image set for ``bank``: the annotations and the images they name are copied into
    the store (``_evalsets/<bank>/<id>/``), so any worker can score on them. Refuses missing images."""
    from decapflow.evaluation.evaluate import load_coco_references

    store = get_store(store)
    references, by_file = load_coco_references(annotations, split)
    missing = [name for name in by_file if not (Path(images) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(by_file)} annotated images are not in {images} "
                                f"(first: {missing[:3]})")
    digest = hashlib.sha256(Path(annotations).read_bytes() + (split or "").encode()).hexdigest()[:10]
    set_id = f"images-{len(by_file)}-{digest}"
    if any(s.id == set_id for s in eval_sets(bank.name, store)):
        raise BankError(f"bank {bank.name!r} already has this image set ({set_id})")
    folder = store.path("_evalsets", bank.name, set_id)
    store.fs.create_dir(folder + "/images", recursive=True)
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    for name in by_file:
        pafs.copy_files(str(Path(images) / name), f"{folder}/images/{name}", source_filesystem=local,
                        destination_filesystem=store.fs)
    refs = {"references": {str(k): v for k, v in references.items()}, "files": {f: str(i) for f, i in by_file.items()}}
    with store.fs.open_output_stream(f"{folder}/references.json") as out:
        out.write(json.dumps(refs).encode())
    info = {"images": len(by_file), "captions": sum(map(len, references.values())), "source": str(annotations),
            "split": split}
    return _record(store, EvalSet(bank.name, set_id, "images", utc_now(), bank.version, True, info=info))


def add_domain_eval_set(bank: MemoryBank, vectors: np.ndarray, source: str, store: Store | str | None = None
                        ) -> EvalSet:
    """Keep the unit CLIP embeddings of (at most ``MAX_DOMAIN``, evenly spread) unlabelled images of ``bank``'s
    domain as its ``domain`` evaluation set (``_evalsets/<bank>/<id>/vectors.npy``); the same images again are
    the same set."""
    import io

    store = get_store(store)
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) > MAX_DOMAIN:
        vectors = vectors[np.linspace(0, len(vectors) - 1, MAX_DOMAIN).round().astype(int)]
    set_id = f"domain-{len(vectors)}-{hashlib.sha256(vectors.tobytes()).hexdigest()[:10]}"
    for existing in eval_sets(bank.name, store):
        if existing.id == set_id:
            return existing
    folder = store.path("_evalsets", bank.name, set_id)
    store.fs.create_dir(folder, recursive=True)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    with store.fs.open_output_stream(f"{folder}/vectors.npy") as out:
        out.write(buffer.getvalue())
    return _record(store, EvalSet(bank.name, set_id, "domain", utc_now(), bank.version, True,
                                  info={"images": len(vectors), "source": source}))


def drop_eval_sets(bank: str, store: Store | str | None = None) -> int:
    """Forget ``bank``'s evaluation sets (records and copied files), e.g. with the bank itself."""
    store = get_store(store)
    count = len(eval_sets(bank, store))
    _table(store).delete(f"bank = '{bank}'")
    store.remove_dir(store.path("_evalsets", bank))
    return count


def drop_eval_sentences(bank: MemoryBank, gone: Iterable[str], store: Store | str | None = None) -> list[str]:
    """Take the sentences whose hashes are in ``gone`` (rows that left ``bank``) out of its text evaluation set:
    the set is recorded again without them, under a new id (``text-N-vVERSION``, ``bank``'s version), and the old
    record is deleted, so its texts leave the store's newest version and no score on it is compared with one on
    the new set. Returns the ids replaced."""
    store = get_store(store)
    gone = set(gone)
    replaced = []
    with store.lock(f"evalset-{bank.name}"):
        for old in [s for s in eval_sets(bank.name, store) if s.kind == "text" and gone & set(s.hashes)]:
            kept = [(h, t) for h, t in zip(old.hashes, old.texts, strict=True) if h not in gone]
            new = EvalSet(bank.name, f"text-{len(kept)}-v{bank.version}", "text", utc_now(), bank.version,
                          old.held_out, [h for h, _ in kept], [t for _, t in kept],
                          {**old.info, "replaces": old.id, "removed": len(old.hashes) - len(kept)})
            _record(store, new)
            _table(store).delete(f"bank = '{bank.name}' AND id = '{old.id}'")
            replaced.append(old.id)
    return replaced


def copy_eval_sets(source: str, target: str, store: Store | str | None = None) -> list[str]:
    """Give bank ``target`` (a clone of ``source``) the same evaluation sets, files included, so its decoders are
    gated on what ``source``'s were. Returns the ids copied."""
    import pyarrow.fs as pafs

    store = get_store(store)
    copied = []
    for evalset in eval_sets(source, store):
        folder = store.path("_evalsets", source, evalset.id)
        if store.exists(folder):
            store.fs.create_dir(store.path("_evalsets", target), recursive=True)
            pafs.copy_files(folder, store.path("_evalsets", target, evalset.id), source_filesystem=store.fs,
                            destination_filesystem=store.fs)
        _record(store, EvalSet(**{**asdict(evalset), "bank": target}))
        copied.append(evalset.id)
    return copied
