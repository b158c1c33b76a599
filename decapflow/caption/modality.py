"""The modality gap: the domain's mean image embedding, mean-shift correction, and CLIP re-ranking of candidates.

CLIP's image and text embeddings lie in two cones: the mean unit image embedding ``mu_img`` and the mean unit text
embedding ``mu_txt`` are ~0.8 apart in real CLIP, while matched pairs still rank first. DeCap's projection (``pd``)
crosses the gap by rebuilding the image from bank sentences, which also snaps it onto combinations the bank holds.
Two more strategies build on this module (``decapflow.caption.captioner``):

``ms``      mean-shift ("Mind the Gap", C3): the prefix is ``normalize(v - mu_img + mu_txt)``: the image moved by
            the mean offset between the two cones. It keeps compositions no bank sentence holds, but the residual
            gap (per-image, not a constant) makes it far noisier than ``pd``.
``rerank``  candidate prefixes per image (:data:`CANDIDATES`: ``pd`` and ``ms``) are decoded in one batch,
            each candidate caption is embedded with the CLIP *text* encoder, and the candidate whose text
            embedding is most similar to the image embedding wins. A ranking survives the gap where absolute
            positions do not: CLIP was trained to rank matched texts first.

``mu_txt`` is the bank's own mean. ``mu_img`` must come from images of the domain (no captions needed): record it
once with ``decapflow memory image-mean BANK --images DIR`` (:func:`image_mean`, :func:`save_image_mean`); it is
kept in the store beside the bank (``_image_means/BANK.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from decapflow.bank.store import Store, get_store
from decapflow.errors import BankError

#: ``rerank``'s candidates, decoded together: DeCap's projection and the mean-shifted image. Measured on the demo
#: world (``benchmarks/rerank_candidates.py``, 200 images): CIDEr 316.9 / 304.1 (plain / --novel) at 0.54-0.73x
#: pd's speed, against 324.6 / 296.6 at 0.24-0.28x for the six candidates pd, nnd, ms and three pd+ms blends.
#: ``Captioner.candidate_prefixes`` makes the others (nnd, vd, pd@TAU, pd+msW); ``clipre`` (the nearest bank
#: sentence, free to add) wins too often: 309.7 / 287.7 with pd and ms.
CANDIDATES: tuple[str, ...] = ("pd", "ms")
#: ``rerank``'s candidates with a retrieval-fused decoder: its two queries, the mean-shifted and the raw image, each
#: decoded with the image's nearest rows. Chosen on world-gap (CIDEr 318.4 / 239.3 plain / new compositions against
#: 317.8 / 235.2 for pd and ms and 308.5 / 229.6 for ``fused`` alone), confirmed on world-rich (docs/guides/fused.md).
FUSED_CANDIDATES: tuple[str, ...] = ("ms", "vd")


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_shift(image_vectors: np.ndarray, image_mean: np.ndarray, text_mean: np.ndarray) -> np.ndarray:
    """``normalize(v - mu_img + mu_txt)`` for each row ``v`` of ``image_vectors`` [B, D]."""
    return unit(np.atleast_2d(image_vectors) - image_mean + text_mean)


def blend(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """``normalize((1 - weight) * a + weight * b)``, row by row."""
    return unit((1.0 - weight) * a + weight * b)


def rows_mean(vectors: Any, chunk_rows: int = 65536) -> np.ndarray:
    """The mean row of a (possibly memory-mapped or bfloat16, see ``projection.BF16Rows``) [N, D] matrix, in
    float64, reading it chunk by chunk."""
    total = np.zeros(vectors.shape[1] if hasattr(vectors, "shape") else len(vectors[0]), dtype=np.float64)
    n = len(vectors)
    for start in range(0, n, chunk_rows):
        total += np.asarray(vectors[start : start + chunk_rows], dtype=np.float64).sum(axis=0)
    return (total / max(n, 1)).astype(np.float32)


def gap(image_mean: np.ndarray, text_mean: np.ndarray) -> float:
    """The modality gap as Liang et al. measure it: ``|mu_img - mu_txt|`` of the mean unit embeddings."""
    return float(np.linalg.norm(np.asarray(image_mean, np.float64) - np.asarray(text_mean, np.float64)))


@dataclass(frozen=True)
class ImageMean:
    """The mean unit image embedding of a domain, from ``images`` images, for banks of encoder ``encoder``."""

    vector: np.ndarray
    images: int
    encoder: str
    source: str = ""

    def to_json(self) -> str:
        return json.dumps({"vector": [round(float(x), 7) for x in self.vector], "images": self.images,
                           "encoder": self.encoder, "source": self.source})

    @classmethod
    def from_json(cls, text: str) -> ImageMean:
        data = json.loads(text)
        return cls(np.asarray(data["vector"], dtype=np.float32), int(data["images"]), data["encoder"],
                   data.get("source", ""))


def embed_images(encoder: Any, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """The unit CLIP embeddings [N, D] of ``images`` (PIL images or preprocessed tensors)."""
    if not images:
        raise ValueError("no images to estimate the mean image embedding from")
    return encoder.encode_image(list(images), batch_size)


def mean_of(vectors: np.ndarray, encoder_spec: str, source: str = "") -> ImageMean:
    """The :class:`ImageMean` of unit image embeddings [N, D]."""
    return ImageMean(np.asarray(vectors, np.float64).mean(axis=0).astype(np.float32), len(vectors), encoder_spec,
                     source)


def record_image_mean(bank: Any, encoder: Any, images: Sequence[Any], source: str = "",
                      store: Store | str | None = None, text_mean: np.ndarray | None = None
                      ) -> tuple[ImageMean, float, np.ndarray]:
    """Embed ``images`` of ``bank``'s domain with ``encoder`` (the bank's), record their mean for the bank and return
    it with the modality gap it shows against the bank's text mean (``text_mean``, when the caller has it) and the
    images' embeddings [N, D] (the gate keeps some: ``decapflow.lifecycle.gate.add_domain_eval_set``)."""
    vectors = embed_images(encoder, images)
    mean = mean_of(vectors, bank.encoder, source=source)
    save_image_mean(bank.name, mean, store)
    if text_mean is None:
        text_mean = rows_mean(bank.vector_cache()[0])
    return mean, gap(mean.vector, text_mean), vectors


def _path(store: Store, bank: str) -> str:
    return store.path("_image_means", f"{bank}.json")


def save_image_mean(bank: str, mean: ImageMean, store: Store | str | None = None) -> None:
    """Record ``mean`` for ``bank`` in the store (replacing an earlier one)."""
    store = get_store(store)
    store.fs.create_dir(store.path("_image_means"), recursive=True)
    with store.fs.open_output_stream(_path(store, bank)) as out:
        out.write(mean.to_json().encode())


def load_image_mean(bank: str, encoder_spec: str, store: Store | str | None = None) -> ImageMean | None:
    """``bank``'s recorded mean image embedding, or None. Refuses one recorded with another encoder."""
    store = get_store(store)
    path = _path(store, bank)
    if not store.exists(path):
        return None
    with store.fs.open_input_stream(path) as stream:
        mean = ImageMean.from_json(stream.read().decode())
    if mean.encoder != encoder_spec:
        raise BankError(f"bank {bank!r}'s mean image embedding was recorded with encoder {mean.encoder!r}, the bank "
                        f"uses {encoder_spec!r}: record it again with decapflow memory image-mean {bank} --images DIR")
    return mean


def drop_image_mean(bank: str, store: Store | str | None = None) -> bool:
    """Forget ``bank``'s mean image embedding (with the bank itself). Returns whether there was one."""
    store = get_store(store)
    path = _path(store, bank)
    if not store.exists(path):
        return False
    store.fs.delete_file(path)
    return True


def rerank(image_vectors: np.ndarray, candidate_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick, per image, the candidate whose text embedding is most similar to the image embedding.

    ``image_vectors`` [B, D] and ``candidate_vectors`` [B, C, D] (CLIP text embeddings of each image's candidate
    captions), unit rows. Returns ``(best [B] candidate index, scores [B, C] cosine similarities)``; ties go to the
    earlier candidate, so list the default strategy first."""
    scores = np.einsum("bd,bcd->bc", np.atleast_2d(image_vectors), candidate_vectors)
    return scores.argmax(axis=1), scores
