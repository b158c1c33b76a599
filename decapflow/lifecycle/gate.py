"""Champion / challenger: each bank's fixed evaluation sets, decoder scores on them, and the promotion rule.

Every bank gets a **text** evaluation set the first time a decoder is trained or gated for it, recorded in the
store's ``_evalsets`` table and never changed: the ``min(500, rows/20)`` bank sentences with the smallest content
hashes (hashes are uniform, so this is a fixed random sample). Training leaves those rows out, and a decoder is
scored by decoding each one's own embedding (greedy): BLEU-4, CIDEr and exact match against the sentence itself.
A bank too small to spare 10 rows scores on up to 100 of its sentences *without* holding them out
(``held_out: false``): enough to tell a decoder that learnt from one that did not, not a generalisation score.

An **image** evaluation set (``decapflow memory eval-set BANK --annotations COCO.json --images DIR``) is copied
into the store and scored by captioning its images with the default strategy (what users get: ``rerank`` when
the bank has a mean image embedding, else ``pd``): CIDEr against the references.

A **domain** set is what a bank without annotated images has of its images: the unlabelled ones behind
``decapflow memory image-mean`` (their embeddings, at most ``MAX_DOMAIN``, are kept beside the mean). It is scored
by reference-free CLIPScore (Hessel et al., EMNLP 2021: ``2.5 * max(cos(image, caption), 0)``, averaged) of the
default strategy's captions. Gating on it judges a decoder on image-like inputs, not on how well it rebuilds exact
text embeddings: a gap-tolerant decoder may do the second a little worse and the first much better. ``auto``
picks, in order: ``images.cider``, ``domain.clipscore``, ``text.cider``. (CLIPScore uses the bank's own CLIP,
which ``rerank`` also ranks with: it rewards a decoder whose candidates hold a caption CLIP finds closer.)

A challenger replaces the current decoder (the champion) only when ``challenger - champion >= margin`` and
``challenger > champion`` on the gate metric, both scored on the same set; scores are kept per decoder and set,
so the champion is scored once. The swap is conditional on the champion still being current, so of two gates
racing, the second compares against the first one's winner.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.store import Store, get_store
from decapflow.decoder.registry import Decoders, decoders, utc_now
from decapflow.errors import BankError

__all__ = ["METRICS", "Decision", "EvalSet", "add_domain_eval_set", "add_image_eval_set", "decide", "drop_eval_sets",
           "eval_sets",
           "held_out_texts",
           "score_decoder", "text_eval_set"]

MAX_TEXT = 500  # held-out sentences per bank at most
MIN_HELD_OUT = 10  # fewer than this to spare: score on training sentences instead
METRICS = ("text.cider", "text.bleu4", "text.exact", "images.cider", "domain.clipscore")
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


def _find(bank: str, kind: str, store: Store) -> EvalSet | None:
    found = [s for s in eval_sets(bank, store) if s.kind == kind]
    return found[-1] if found else None


def _record(store: Store, evalset: EvalSet) -> EvalSet:
    row = {**asdict(evalset), "info": json.dumps(evalset.info)}
    _table(store).add(pa.Table.from_pylist([row], schema=SCHEMA))
    return evalset


def text_eval_set(bank: MemoryBank, store: Store | str | None = None, create: bool = True) -> EvalSet | None:
    """``bank``'s text evaluation set, chosen and recorded on first use (see the module docstring)."""
    store = get_store(store)
    if (found := _find(bank.name, "text", store)) is not None or not create:
        return found
    with store.lock(f"evalset-{bank.name}"):
        if (found := _find(bank.name, "text", store)) is not None:
            return found
        hashes = sorted(bank.hashes())
        n = min(MAX_TEXT, len(hashes) // 20)
        held_out = n >= MIN_HELD_OUT
        chosen = hashes[:n] if held_out else hashes[: min(len(hashes), 100)]
        if not chosen:
            raise BankError(f"bank {bank.name!r} is empty: nothing to evaluate decoders on")
        texts = dict(zip(*_rows(bank, chosen, ["hash", "text"]), strict=True))
        return _record(store, EvalSet(bank.name, f"text-{len(chosen)}-v{bank.version}", "text", utc_now(),
                                      bank.version, held_out, chosen, [texts[h] for h in chosen]))


def held_out_texts(bank: str, store: Store | str | None = None) -> set[str]:
    """Sentences training must leave out: the text evaluation set's, when it holds them out."""
    evalset = _find(bank, "text", get_store(store))
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


# ------------------------------------------------------------------------------------------- scoring
def _rows(bank: MemoryBank, hashes: list[str], columns: list[str]) -> list[list[Any]]:
    quoted = ", ".join(f"'{h}'" for h in hashes)
    table = bank.table.search().where(f"hash IN ({quoted})").select(columns).limit(None).to_arrow()
    return [table.column(c).to_pylist() for c in columns]


def _score_text(model: Any, vocab: Any, bank: MemoryBank, evalset: EvalSet) -> dict[str, float]:
    from decapflow.evaluation.evaluate import score_captions

    hashes, texts, vectors = _rows(bank, evalset.hashes, ["hash", "text", "vector"])
    if len(hashes) != len(evalset.hashes):
        raise BankError(f"bank {bank.name!r} lost rows of its evaluation set {evalset.id}")
    predictions = model.decode_texts(np.asarray(vectors, dtype=np.float32), vocab, max_len=30)
    refs = {i: [t] for i, t in enumerate(texts)}
    metrics = score_captions(refs, dict(enumerate(predictions)), metrics=("bleu", "cider"))
    exact = float(np.mean([p.strip().lower() == t.strip().lower() for p, t in zip(predictions, texts, strict=True)]))
    return {"bleu4": metrics["BLEU-4"], "cider": metrics["CIDEr"], "exact": exact}


def _score_images(captioner: Any, store: Store, evalset: EvalSet) -> dict[str, float]:
    from decapflow.caption.images import load_image
    from decapflow.config import cache_dir
    from decapflow.evaluation.evaluate import score_captions

    parts = ("_evalsets", evalset.bank, evalset.id)
    local = store.local_path(*parts)
    if local is None:  # a remote store: fetched once into the local cache
        local = store.get_dir(store.path(*parts), cache_dir() / "evalsets" / store.key / evalset.bank / evalset.id)
        store.get_dir(store.path(*parts, "images"), local / "images")
    local_images = local / "images"
    refs = json.loads((local / "references.json").read_text())
    files = sorted(refs["files"])
    captions = captioner.caption([load_image(local_images / f) for f in files])
    predictions = {refs["files"][f]: c.caption for f, c in zip(files, captions, strict=True)}
    return {"cider": score_captions(refs["references"], predictions, metrics=("cider",))["CIDEr"]}


def _score_domain(captioner: Any, store: Store, evalset: EvalSet) -> dict[str, float]:
    """Mean CLIPScore (2.5 * max(cos, 0)) of the captions of the set's unlabelled image embeddings."""
    import io

    with store.fs.open_input_stream(store.path("_evalsets", evalset.bank, evalset.id, "vectors.npy")) as stream:
        vectors = np.load(io.BytesIO(stream.read()), allow_pickle=False)
    captions = [c.caption for c in captioner.caption_embeddings(vectors)]
    texts = captioner.encoder.encode_text(captions)
    cosines = np.sum(np.asarray(vectors, np.float32) * np.asarray(texts, np.float32), axis=1)
    return {"clipscore": float(2.5 * np.maximum(cosines, 0.0).mean())}


def score_decoder(bank: MemoryBank, decoder_id: str, evalset: EvalSet, store: Store | str | None = None,
                  device: str | None = None) -> dict[str, float]:
    """The decoder's scores on ``evalset`` (computed once, then read from its record)."""
    reg = decoders(store)
    record = reg.record(bank.name, decoder_id)
    if record is None:
        raise BankError(f"bank {bank.name!r} has no decoder {decoder_id!r}")
    from decapflow.caption.modality import load_image_mean

    mean = load_image_mean(bank.name, bank.encoder, store) if evalset.kind != "text" else None
    strategy = "text" if evalset.kind == "text" else ("rerank" if mean is not None else "pd")  # what users get
    cached = record["scores"].get(evalset.id)
    if cached is not None and cached.get("strategy", "pd" if evalset.kind == "images" else "text") == strategy:
        return cached  # scored before, the same way (a newly recorded image mean changes the way)
    from decapflow.caption.captioner import Captioner, check_decoder_encoder
    from decapflow.decoder.checkpoint import load_decoder
    from decapflow.encoders import load_encoder

    start = time.perf_counter()
    folder = reg.local(bank.name, decoder_id)
    model, vocab, meta = load_decoder(folder, device or "cpu")
    check_decoder_encoder(meta, folder, bank)
    if evalset.kind == "text":
        scores = _score_text(model, vocab, bank, evalset)
    else:
        captioner = Captioner(load_encoder(bank.encoder, device), bank, model, vocab)
        captioner.image_mean = mean
        score = _score_images if evalset.kind == "images" else _score_domain
        scores = score(captioner, reg.store, evalset)
    scores = {**{k: round(v, 6) for k, v in scores.items()}, "n": len(evalset.hashes) or evalset.info["images"],
              "strategy": strategy, "seconds": round(time.perf_counter() - start, 2)}
    reg.update(bank.name, decoder_id, scores={evalset.id: scores})
    return scores


# ------------------------------------------------------------------------------------------- the rule
@dataclass
class Decision:
    bank: str
    challenger: str
    champion: str | None
    promoted: bool
    gated: bool
    metric: str
    eval_set: str
    challenger_score: float
    champion_score: float | None
    margin: float
    reason: str
    bank_version: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = (f"is now current for bank {self.bank!r}" if self.promoted
                   else f"rejected for bank {self.bank!r} (decoder {self.champion} stays current)")
        versus = (f" vs {self.champion_score:.4f} for {self.champion}" if self.champion_score is not None
                  else "")
        return (f"decoder {self.challenger} {verdict}: {self.metric} {self.challenger_score:.4f}{versus} on "
                f"{self.eval_set} ({self.reason}; scored in {self.seconds:.1f} s)")


def _metric_set(bank: MemoryBank, metric: str, store: Store) -> tuple[str, EvalSet]:
    if metric == "auto":
        metric = ("images.cider" if _find(bank.name, "images", store) else
                  "domain.clipscore" if _find(bank.name, "domain", store) else "text.cider")
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; choose from auto, {', '.join(METRICS)}")
    kind = metric.split(".")[0]
    evalset = text_eval_set(bank, store) if kind == "text" else _find(bank.name, kind, store)
    if evalset is None and kind == "images":
        raise BankError(f"bank {bank.name!r} has no image evaluation set; add one with: decapflow memory eval-set "
                        f"{bank.name} --annotations COCO.json --images DIR")
    if evalset is None:
        raise BankError(f"bank {bank.name!r} has no domain images; record them with: decapflow memory image-mean "
                        f"{bank.name} --images DIR")
    return metric, evalset


def decide(bank_name: str, challenger: str, *, gate: bool = True, metric: str = "auto", margin: float = 0.0,
           store: Store | str | None = None, device: str | None = None, emit: bool = True) -> Decision:
    """Score challenger ``challenger`` and make it current when it beats the champion by ``margin`` (``gate``),
    or in any case (``gate=False``: by hand, still scored and recorded). Records the decision on the
    challenger, marks a loser ``rejected``, and emits ``decapflow.decoder.promoted|rejected``."""
    start = time.perf_counter()
    store = get_store(store)
    reg: Decoders = decoders(store)
    bank = Registry(store).open(bank_name)
    metric, evalset = _metric_set(bank, metric, store)
    key = metric.split(".")[1]
    mine = score_decoder(bank, challenger, evalset, store, device)[key]
    for _ in range(10):  # a concurrent promotion moves the champion: compare again against the new one
        champion = reg.current_id(bank_name)
        theirs = score_decoder(bank, champion, evalset, store, device)[key] if champion else None
        if champion == challenger:  # the same weights registered again (same id): nothing to decide
            promote, reason = True, "it is the current decoder already"
        elif champion is None:
            promote, reason = True, "first decoder of the bank"
        elif not gate:
            promote, reason = True, "ungated (by hand)"
        else:
            promote = mine > theirs and mine - theirs >= margin
            reason = (f"beats the champion by {mine - theirs:+.4f} (margin {margin})" if promote
                      else f"does not beat the champion by the margin {margin} ({mine - theirs:+.4f})")
        if promote and champion != challenger and not reg.set_current(bank_name, challenger, expected=champion,
                                                                      reason=reason):
            continue
        break
    else:
        raise BankError(f"bank {bank_name!r}: the current decoder kept changing while gating {challenger}")
    record = reg.record(bank_name, challenger)
    decision = Decision(bank_name, challenger, champion, promote, gate, metric, evalset.id, mine, theirs, margin,
                        reason, record.get("bank_version") if record else None, round(time.perf_counter() - start, 2))
    reg.update(bank_name, challenger, status=None if promote else "rejected", decision=decision.to_dict())
    if emit:
        from decapflow.bank.events import decoder_decided

        decoder_decided(decision.to_dict())
    return decision
