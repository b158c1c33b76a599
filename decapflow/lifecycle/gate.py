"""Champion / challenger: decoder scores on each bank's evaluation sets (:mod:`decapflow.lifecycle.evalsets`) and
the promotion rule.

On the **text** set a decoder is scored by decoding each held-out sentence's own embedding (greedy): BLEU-4, CIDEr
and exact match against the sentence itself. On an **image** set it captions the images with the default strategy
(what users get: ``rerank`` when the bank has a mean image embedding, else ``pd``): CIDEr against the references.
A **domain** set (the unlabelled images behind ``decapflow memory image-mean``) is scored by reference-free
CLIPScore (Hessel et al., EMNLP 2021: ``2.5 * max(cos(image, caption), 0)``, averaged) of the default strategy's
captions. Gating on it judges a decoder on image-like inputs, not on how well it rebuilds exact text embeddings: a
gap-tolerant decoder may do the second a little worse and the first much better. ``auto`` picks, in order:
``images.cider``, ``domain.clipscore``, ``text.cider``. (CLIPScore uses the bank's own CLIP, which ``rerank`` also
ranks with: it rewards a decoder whose candidates hold a caption CLIP finds closer.)

A challenger replaces the current decoder (the champion) only when ``challenger - champion >= margin`` and
``challenger > champion`` on the gate metric, both scored on the same set; scores are kept per decoder and set,
so the champion is scored once. The swap is conditional on the champion still being current, so of two gates
racing, the second compares against the first one's winner.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.store import Store, get_store
from decapflow.decoder.registry import Decoders, decoders
from decapflow.errors import BankError
from decapflow.lifecycle.evalsets import (  # noqa: F401  (the sets are importable from here, as before)
    EvalSet,
    add_domain_eval_set,
    add_image_eval_set,
    drop_eval_sets,
    eval_sets,
    find_eval_set,
    held_out_texts,
    rows_by_hash,
    text_eval_set,
)

__all__ = ["METRICS", "Decision", "EvalSet", "add_domain_eval_set", "add_image_eval_set", "decide", "drop_eval_sets",
           "eval_sets", "held_out_texts", "score_decoder", "text_eval_set"]

METRICS = ("text.cider", "text.bleu4", "text.exact", "images.cider", "domain.clipscore")
SELF_COS = 0.9999  # a fused decoder scored on a bank sentence never reads that sentence itself


# ------------------------------------------------------------------------------------------- scoring
def _score_text(model: Any, vocab: Any, bank: MemoryBank, evalset: EvalSet) -> dict[str, float]:
    from decapflow.evaluation.evaluate import score_captions

    hashes, texts, vectors = rows_by_hash(bank, evalset.hashes, ["hash", "text", "vector"])
    if len(hashes) != len(evalset.hashes):
        raise BankError(f"bank {bank.name!r} lost rows of its evaluation set {evalset.id}")
    vectors = np.asarray(vectors, dtype=np.float32)
    near = prompt = None
    if model.fused:  # each sentence reads its nearest bank rows, never itself (as in training)
        from decapflow.caption.fused import entity_prompt
        from decapflow.decoder.retrieval import nearest

        pool, pool_texts = bank.vector_cache()
        ids, _ = nearest(vectors, pool, model.config.neighbors, clean=vectors, exclude_cos=SELF_COS)
        near = np.asarray(pool[ids.reshape(-1)], dtype=np.float32).reshape(*ids.shape, -1)
        prompt = entity_prompt(model, vocab, [[pool_texts[int(i)].as_py() for i in row] for row in ids])
    predictions = model.decode_texts(vectors, vocab, max_len=30, neighbours=near, prompt=prompt)
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
    fused = bool(record.get("fused"))  # what users get: auto's strategy for this decoder and bank
    strategy = "text" if evalset.kind == "text" else "fused" if fused else "rerank" if mean is not None else "pd"
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
        metric = ("images.cider" if find_eval_set(bank.name, "images", store) else
                  "domain.clipscore" if find_eval_set(bank.name, "domain", store) else "text.cider")
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; choose from auto, {', '.join(METRICS)}")
    kind = metric.split(".")[0]
    evalset = text_eval_set(bank, store) if kind == "text" else find_eval_set(bank.name, kind, store)
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
