"""Captioning with a retrieval-fused decoder (:mod:`decapflow.decoder.fusion`): each image retrieves its nearest bank
rows, and the decoder reads them beside the query token.

``fused``, the strategy: the query token is the image moved across the modality gap (``ms``) when the bank has a
recorded image mean, else the raw image (``vd``) (``Options.query`` picks another: any single-prefix strategy),
and the neighbours are the ``l`` bank rows nearest to the raw image (CLIP ranks sentences for an image across the
gap; ``Options.neighbours``, default: as many as the decoder was trained with). Every other decoding strategy
run with a fused decoder (pd, topk, nnd, ms, vd, and rerank's candidates) gets the same neighbours beside its own
prefix. The rows come from the exact top-l over the bank's local copy, or on big banks from its in-process IVF
(:mod:`decapflow.bank.ivf`; LanceDB's index when only that exists), as ``topk``'s do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from decapflow.caption import projection
from decapflow.decoder.entities import prompts, text_sets
from decapflow.errors import BankError

__all__ = ["QUERIES", "Neighbours", "check_neighbours", "neighbours", "query_name", "require_fused"]

#: What ``Options.query`` may name: the prefix strategy whose vector is the fused decoder's query token.
QUERIES = ("auto", "ms", "vd", "pd", "topk", "nnd")


class Neighbours:
    """The bank rows each image retrieved: vectors [B, l, D] (float32, nearest first), their texts and cosines, and
    for a decoder with an entity prompt each image's prompt [B, T] (:mod:`decapflow.decoder.entities`)."""

    def __init__(self, vectors: np.ndarray, texts: list[list[str]], sims: np.ndarray,
                 prompt: np.ndarray | None = None) -> None:
        self.vectors, self.texts, self.sims, self.prompt = vectors, texts, sims, prompt

    def support(self, n: int) -> list[list[tuple[str, float]]]:
        return [[(t, round(float(s), 4)) for t, s in zip(row[:n], sims[:n], strict=True) if t]
                for row, sims in zip(self.texts, self.sims, strict=True)]

    def tiled(self, times: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The vectors (and prompts) repeated for ``times`` candidate prefixes per image, candidate-major
        ([C*B, l, D], [C*B, T])."""
        if times == 1:
            return self.vectors, self.prompt
        prompt = None if self.prompt is None else np.concatenate([self.prompt] * times)
        return np.concatenate([self.vectors] * times), prompt


def require_fused(captioner: Any) -> None:
    if captioner.decoder is None or not captioner.decoder.fused:
        name = captioner.bank.name
        raise BankError(f"strategy 'fused' needs a retrieval-fused decoder, and bank {name!r}'s decoder is a plain "
                        f"one; train one with: decapflow train --memory {name} --fused (or pick another --strategy)")


def check_neighbours(config: Any, rows: int) -> None:
    """A tokens-fused decoder has prefix positions for the k rows it was trained with, no more; xattn takes any."""
    if rows < 1:
        raise ValueError(f"neighbours must be at least 1, not {rows}")
    if config.fusion == "tokens" and rows > config.neighbors:
        raise ValueError(f"this decoder fuses its rows as prefix tokens and was trained with {config.neighbors}; it "
                         f"reads at most {config.neighbors} (an xattn decoder takes any number)")


def query_name(captioner: Any) -> str:
    """The prefix strategy ``fused`` uses as its query token (``Options.query``; ``auto``: ms with an image mean,
    else vd)."""
    query = captioner.options.query
    if query == "auto":
        return "ms" if captioner.image_mean is not None else "vd"
    return query


def neighbours(captioner: Any, image_vectors: np.ndarray) -> Neighbours:
    """Each image's ``l`` nearest bank rows (``Options.neighbours``, default the decoder's k)."""
    l_rows = captioner.options.neighbours or captioner.decoder.config.neighbors
    image_vectors = np.atleast_2d(image_vectors)
    indexed = captioner.uses_index()
    index = captioner.bank.ivf(captioner.precision, build=not captioner.auto) if indexed else None
    if index is not None:  # the in-process IVF (padded with -1 when its probes held fewer rows)
        ids, sims = index.search(image_vectors, l_rows)
        vectors = projection.gather_neighbors(captioner.vectors, ids)
        texts = [[captioner._text(i) if i >= 0 else "" for i in row] for row in ids]
        return Neighbours(vectors, texts, np.where(ids >= 0, sims, 0).astype(np.float32))
    if indexed:  # auto on a bank with LanceDB's index and no IVF for this version yet
        vectors, texts = captioner.bank.ann_neighbors(image_vectors, l_rows)
        sims = np.einsum("bkd,bd->bk", vectors, projection.identity(image_vectors))
    else:
        ids, sims = projection.nearest(image_vectors, captioner.vectors, k=l_rows)
        vectors = np.asarray(captioner.vectors[ids.reshape(-1)], dtype=np.float32).reshape(*ids.shape, -1)
        texts = [[captioner._text(i) for i in row] for row in ids]
    return Neighbours(vectors, texts, sims, entity_prompt(captioner.decoder, captioner.vocab, texts))


def entity_prompt(decoder: Any, vocab: Any, texts: list[list[str]]) -> np.ndarray | None:
    """Each image's entity prompt from its neighbours' texts, for a decoder that reads one (else None)."""
    if not decoder.config.prompt_tokens:
        return None
    df = decoder.token_df.detach().cpu().numpy()
    return prompts([text_sets([t for t in row if t], vocab) for row in texts], df, decoder.config.prompt_min_count,
                   vocab.end_id)
