"""CLIP BPE tokens, the compact decoder vocabulary, and padded caption batches for training.

The decoder speaks CLIP's BPE vocabulary (49,408 ids; ``<start>`` = 49406, ``<end>`` = 49407), tokenised with
open_clip's bundled ``SimpleTokenizer`` (works offline). A caption becomes ``<start> w1 ... wn <end>``, cut to
``max_tokens`` ids the way the official DeCap code cuts its padded ``clip.tokenize`` output (a long caption keeps
``<start>`` and its first words and loses ``<end>``).

A corpus of captions uses a few thousand of the 49,408 ids, so a :class:`Vocab` maps the CLIP ids that occur in
the training texts (plus start and end) onto compact ids ``0..n-1``: the embedding table, the output layer and
the softmax shrink by 5-20×. Compact ids are sorted by CLIP id, so start/end come last. The vocabulary is saved
inside each checkpoint (``vocab.json``). ``Vocab.identity()`` keeps all ids (used for official checkpoints).

Padding: batches are right-padded after ``<end>``; padded inputs are never attended to by real positions (causal
attention) and padded targets are ignored by the loss, so the vocabulary needs no padding id. CLIP id 0 is the
real token ``!``; only identity vocabularies of official checkpoints, which trained with id 0 as padding, drop
it when decoding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
import sys
import zipfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from decapflow.decoder.distributed import Dist

START_ID = 49406
END_ID = 49407
CLIP_VOCAB_SIZE = 49408
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")
Texts = Sequence[str] | pa.Array | pa.ChunkedArray  # a list, or the Arrow column of a memory bank's cache


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    """open_clip's bundled CLIP BPE tokenizer (lower-cases and cleans text; no network).

    ``import open_clip`` costs ~5 s (it pulls in torchvision), so when it is not loaded yet we load just its
    self-contained ``tokenizer.py`` from the installed package; same code, same BPE file."""
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is not None and spec.origin:
            path = Path(spec.origin).with_name("tokenizer.py")
            file_spec = importlib.util.spec_from_file_location("_decapflow_clip_tokenizer", path)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                return module.SimpleTokenizer()
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Iterable[str], max_tokens: int | None = None) -> list[list[int]]:
    """CLIP ids ``[<start>, w1, ..., wn, <end>]`` per text, cut to ``max_tokens`` ids (None: no cut)."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (<start> and one more token), got {max_tokens}")
    encode = clip_tokenizer().encode
    rows = [[START_ID, *encode(text), END_ID] for text in texts]
    return rows if max_tokens is None else [row[:max_tokens] for row in rows]


class TextRows(Collection[str]):
    """``texts[rows]`` read in chunks, without a Python list of them all (an Arrow column is read through
    ``take``, so a memory-mapped bank cache stays on disk)."""

    def __init__(self, texts: Texts, rows: np.ndarray) -> None:
        self.texts, self.rows = texts, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[str]:
        for i in range(0, len(self.rows), 1 << 16):
            chunk = self.rows[i : i + (1 << 16)]
            if isinstance(self.texts, pa.Array | pa.ChunkedArray):
                yield from self.texts.take(pa.array(chunk)).to_pylist()
            else:
                yield from (self.texts[j] for j in chunk.tolist())

    def __contains__(self, text: object) -> bool:
        return any(t == text for t in self)


def texts_key(texts: Collection[str], max_tokens: int | None) -> str:
    """A content hash of the texts and the cut: the key of the token cache."""
    digest = hashlib.sha256(f"clip-bpe|{max_tokens}|{len(texts)}\n".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def load_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``flat`` and ``offsets`` of a token cache file, memory-mapped: ``np.savez`` stores its members
    uncompressed, so each is a ``.npy`` at a fixed place in the zip (anything else is read the plain way)."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                with np.load(path) as saved:
                    return saved["flat"], saved["offsets"]
            raw.seek(info.header_offset + 26)  # local file header: name and extra-field lengths, then the data
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(member)
                start = info.header_offset + 30 + name_len + extra_len + member.tell()
            name = info.filename.removesuffix(".npy")
            arrays[name] = np.memmap(path, dtype, "r", start, shape, "F" if fortran else "C") \
                if np.prod(shape) else np.zeros(shape, dtype)
    return arrays["flat"], arrays["offsets"]


def tokenize_cached(
    texts: Collection[str], max_tokens: int | None, cache_dir: Path | None, key: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise once; return CLIP ids as one flat array plus offsets (row i is ``flat[off[i]:off[i+1]]``).

    With ``cache_dir`` the result is stored as ``<cache_dir>/<texts_key>.npz`` (``key``: that key, already
    computed) and reused, memory-mapped, by later calls on the same texts (560k COCO captions take ~30 s to
    tokenise, ~0.1 s to reload)."""
    path = cache_dir / f"{key or texts_key(texts, max_tokens)}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        return load_tokens(path)
    rows = tokenize(texts, max_tokens)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    if path is None:
        return flat, offsets
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # ranks of another node may write at the same time
    np.savez(tmp, flat=flat, offsets=offsets)
    tmp.replace(path)
    return load_tokens(path)


def shared_tokens(texts: Collection[str], max_tokens: int, cache: Path | None, dist: Dist
                  ) -> tuple[str, np.ndarray, np.ndarray]:
    """(texts key, flat, offsets), tokenised once: rank 0 tokenises (or reads the cache) and broadcasts the key
    when done; the other ranks then memory-map that cache file (without a cache, rank 0 sends them the tokens)."""
    if dist.main:
        key = texts_key(texts, max_tokens)
        flat, offsets = tokenize_cached(texts, max_tokens, cache, key)
        dist.broadcast((key, None if cache else (flat, offsets)))
        return key, flat, offsets
    key, sent = cast(tuple[str, tuple[np.ndarray, np.ndarray] | None], dist.broadcast(None))
    # the cache rank 0 filled; a node that does not see it (another machine) tokenises into its own
    flat, offsets = sent if sent is not None else tokenize_cached(texts, max_tokens, cache, key)
    return key, flat, offsets


@dataclass
class Vocab:
    """Compact id ``i`` ↔ CLIP id ``clip_ids[i]``. Build with :meth:`build` or :meth:`identity`."""

    clip_ids: list[int]
    drop_clip_ids: tuple[int, ...] = ()  # CLIP ids dropped by decode() (0 for official checkpoints)
    _lookup: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = np.asarray(self.clip_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or len(np.unique(ids)) != len(ids):
            raise ValueError("Vocab.clip_ids must be distinct non-negative CLIP ids")
        if START_ID not in self.clip_ids or END_ID not in self.clip_ids:
            raise ValueError(f"Vocab must contain <start> ({START_ID}) and <end> ({END_ID})")
        self._lookup = np.full(max(CLIP_VOCAB_SIZE, int(ids.max()) + 1), -1, dtype=np.int64)
        self._lookup[ids] = np.arange(len(ids))

    @classmethod
    def build(cls, clip_ids: Iterable[int] | np.ndarray) -> Vocab:
        """The compact vocabulary of the CLIP ids seen (plus start and end), sorted by CLIP id."""
        seen = np.unique(np.asarray(list(clip_ids) if not isinstance(clip_ids, np.ndarray) else clip_ids))
        return cls(sorted({int(i) for i in seen} | {START_ID, END_ID}))

    @classmethod
    def identity(cls, size: int = CLIP_VOCAB_SIZE, drop_clip_ids: tuple[int, ...] = ()) -> Vocab:
        """All ids ``0..size-1`` map to themselves (``size`` must cover CLIP's 49,408)."""
        if size < CLIP_VOCAB_SIZE:
            raise ValueError(f"an identity vocabulary needs at least the {CLIP_VOCAB_SIZE} CLIP ids, got {size}")
        return cls(list(range(size)), drop_clip_ids)

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.clip_ids, np.arange(len(self.clip_ids))))

    @property
    def start_id(self) -> int:
        return int(self._lookup[START_ID])

    @property
    def end_id(self) -> int:
        return int(self._lookup[END_ID])

    def to_compact(self, clip_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """CLIP ids → compact ids; raises ValueError naming ids the vocabulary has never seen."""
        ids = np.asarray(clip_ids, dtype=np.int64)
        out = self._lookup[np.clip(ids, 0, len(self._lookup) - 1)]
        bad = (out < 0) | (ids >= len(self._lookup)) | (ids < 0)
        if bad.any():
            unknown = sorted({int(i) for i in ids[bad]})[:10]
            words = [clip_tokenizer().decoder.get(i, "?") for i in unknown]
            raise ValueError(f"CLIP ids not in this decoder's vocabulary: {unknown} ({words}); "
                             "the text uses words the decoder was never trained on")
        return out

    def to_clip(self, compact_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Compact ids → CLIP ids."""
        return np.asarray(self.clip_ids, dtype=np.int64)[np.asarray(compact_ids, dtype=np.int64)]

    def encode(self, text: str) -> list[int]:
        """Compact ids of ``<start> text <end>``."""
        return self.to_compact(tokenize([text])[0]).tolist()

    def decode(self, compact_ids: Sequence[int]) -> str:
        """Clean text: stops at ``<end>``, drops start/end and padding ids, tidies spaces before punctuation."""
        tok = clip_tokenizer()
        clip = self.to_clip(list(compact_ids)).tolist() if len(compact_ids) else []
        if END_ID in clip:
            clip = clip[: clip.index(END_ID)]
        keep = [i for i in clip if i != START_ID and i not in self.drop_clip_ids and i in tok.decoder]
        text = " ".join(tok.decode(keep).split())
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)

    def to_dict(self) -> dict[str, Any]:
        if self.is_identity:
            return {"kind": "identity", "size": len(self), "drop_clip_ids": list(self.drop_clip_ids)}
        return {"kind": "compact", "clip_ids": self.clip_ids, "drop_clip_ids": list(self.drop_clip_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocab:
        drop = tuple(int(i) for i in data.get("drop_clip_ids", ()))
        if data.get("kind") == "identity":
            return cls.identity(int(data["size"]), drop)
        if data.get("kind") == "compact":
            return cls([int(i) for i in data["clip_ids"]], drop)
        raise ValueError(f"unknown vocabulary kind {data.get('kind')!r} (expected 'compact' or 'identity')")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls.from_dict(json.loads(Path(path).read_text()))


class Captions:
    """Caption rows for training: CLIP token rows (flat + offsets, memory-mapped from the token cache) and rows
    ``rows`` of ``vectors`` (maybe a memmap, shared between torchrun ranks through the page cache). A batch
    gathers its token rows and vectors, maps the ids onto the compact vocabulary and re-normalises the vectors."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, vectors: np.ndarray, rows: np.ndarray,
                 vocab: Vocab, key: str) -> None:
        self.flat, self.offsets, self.vectors, self.rows = flat, offsets, vectors, rows
        self.vocab, self.key = vocab, key  # key: the texts' content hash (texts_key)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray, prompt: np.ndarray | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``prefix`` [B, D], ``inputs`` [B, L-1] (padded with <end>), ``targets`` [B, L-1] (padded with -100).
        With an entity ``prompt`` [B, T] (compact ids) the inputs start with it and its targets are -100."""
        if prompt is not None:
            prefix, inputs, targets = self.batch(index)
            given = torch.as_tensor(prompt, dtype=torch.long)
            ignored = torch.full_like(given, -100)
            return prefix, torch.cat([given, inputs], 1), torch.cat([ignored, targets], 1)
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        L = int(lengths.max())
        cols = np.arange(L)
        valid = cols[None, :] < lengths[:, None]  # [B, L]
        pos = np.minimum(starts[:, None] + cols[None, :], len(self.flat) - 1)
        ids = torch.from_numpy(np.where(valid, self.vocab.to_compact(self.flat[pos]), -100))  # [B, L]
        inputs = ids[:, :-1].masked_fill(ids[:, :-1] < 0, self.vocab.end_id)
        prefix = torch.from_numpy(np.asarray(self.vectors[self.rows[index]], dtype=np.float32))
        return torch.nn.functional.normalize(prefix, dim=-1), inputs, ids[:, 1:]

    def unit_rows(self) -> np.ndarray:
        """The training rows' vectors, re-normalised, as one float32 array [len(self), D] (the pool a fused
        decoder's captions retrieve their neighbours from; a copy)."""
        rows = np.asarray(self.vectors[self.rows], dtype=np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def prepare(texts: Texts, vectors: np.ndarray, max_tokens: int, cache: Path | None, *,
            rows: np.ndarray | None = None, dist: Dist | None = None) -> tuple[Captions, Vocab]:
    """Tokenise (once, cached), build the compact vocabulary, check the vectors. ``rows``: the rows of ``texts``
    and ``vectors`` to train on (default all); the vectors are not copied (batches gather and normalise them)."""
    if not isinstance(vectors, np.ndarray):
        vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(f"need one vector per text: {len(texts)} texts, vectors of shape {vectors.shape}")
    rows = np.arange(len(texts)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        raise ValueError("need at least 2 texts (one for training, one for validation)")
    key, flat, offsets = shared_tokens(TextRows(texts, rows), max_tokens, cache, dist or Dist())
    seen = np.zeros(CLIP_VOCAB_SIZE, dtype=bool)
    for i in range(0, len(flat), 1 << 20):  # in chunks: no private copy of all the tokens
        seen[flat[i : i + (1 << 20)]] = True
    vocab = Vocab.build(np.flatnonzero(seen))
    return Captions(flat, offsets, vectors, rows, vocab, key), vocab
