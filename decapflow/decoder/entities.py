"""The entity prompt of a retrieval-fused decoder (IFCap's, made language-agnostic): the words its neighbours agree
on, given to the decoder as text before it starts the caption.

IFCap tags the nouns of the retrieved captions and prompts "There are e1, e2 in image" with those counted often
enough. A tagger is language-specific; here a *word* is a CLIP BPE token, and a token is an entity of a caption
when at least ``min_count`` of its ``k`` neighbours hold it and it is ``LIFT`` more common among them than among
the bank's sentences (function words, frequent everywhere, never are). Up to :data:`PROMPT_TOKENS` entities, the
most agreed on first, make the prompt; shorter prompts are padded with ``<end>``, so every prompt has the same length
and batches stay rectangular. The decoder reads ``[prefix][prompt][<start>] w1 ... wn`` and is trained on the
caption tokens only.

The bank frequencies of the tokens (``token_df``, one per compact id) are computed on the training rows and saved
in the decoder's meta, so captioning needs no pass over the bank.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LIFT", "PROMPT_TOKENS", "document_frequency", "prompts", "text_sets", "token_sets"]

PROMPT_TOKENS = 6
#: How much more often than in the bank a token must occur among a caption's neighbours to be an entity.
LIFT = 0.4


def token_sets(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray, to_compact) -> list[np.ndarray]:
    """Each row's distinct compact token ids (``<start>``/``<end>`` included; they are filtered by frequency like
    any function word)."""
    return [np.unique(to_compact(flat[offsets[r] : offsets[r + 1]])) for r in rows]


def text_sets(texts: list[str], vocab) -> list[np.ndarray]:
    """The distinct compact ids of each text (CLIP BPE; ids the decoder never saw are left out)."""
    from decapflow.decoder.vocab import tokenize

    lookup = vocab._lookup  # noqa: SLF001 - CLIP id -> compact id, -1 where unknown
    out = []
    for ids in tokenize(texts):
        ids = np.asarray(ids, dtype=np.int64)
        compact = lookup[np.clip(ids, 0, len(lookup) - 1)]
        out.append(np.unique(compact[(compact >= 0) & (ids < len(lookup))]))
    return out


def document_frequency(sets: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """The share of rows holding each compact id [V] (float32)."""
    counts = np.zeros(vocab_size, np.int64)
    for s in sets:
        counts[s] += 1
    return (counts / max(len(sets), 1)).astype(np.float32)


def prompts(neighbour_sets: list[list[np.ndarray]], df: np.ndarray, min_count: int, fill: int) -> np.ndarray:
    """The prompt of each caption or image from its neighbours' token sets: [B, PROMPT_TOKENS] compact ids, the
    entities first (most neighbours first, then rarest in the bank), ``fill`` after them."""
    out = np.full((len(neighbour_sets), PROMPT_TOKENS), fill, dtype=np.int64)
    for i, sets in enumerate(neighbour_sets):
        if not sets:
            continue
        ids, counts = np.unique(np.concatenate(sets), return_counts=True)
        share = counts / len(sets)
        keep = (counts >= min_count) & (share >= df[ids] + LIFT)
        ids, counts = ids[keep], counts[keep]
        order = np.lexsort((df[ids], -counts))[:PROMPT_TOKENS]
        out[i, : len(order)] = ids[order]
    return out
