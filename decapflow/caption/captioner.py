"""Captioner: images -> CLIP image embeddings -> a strategy's prefix vectors -> decoder -> captions.

``Captioner(encoder, bank, decoder, vocab, strategy).caption(images)`` returns one :class:`Caption` per image with
the top supporting bank sentences and their weights, so a user sees why a caption came out. ``pd`` (and rerank's
``pd`` candidates) project with numpy on CPU and, when the decoder is on CUDA, through a bank copy held on the GPU
(:class:`~decapflow.caption.device_projection.BankProjector`, built on first use and shared by ``with_options``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from decapflow import cpu
from decapflow.bank.memory import BankError, MemoryBank, Registry
from decapflow.bank.refs import BankRef
from decapflow.bank.rows import BF16Rows
from decapflow.caption import fused, modality, projection
from decapflow.caption.decoders import check_decoder_encoder, resolve_decoder  # noqa: F401  (importable from here)
from decapflow.caption.device_projection import BankProjector
from decapflow.config import default_device
from decapflow.decoder.checkpoint import load_decoder
from decapflow.decoder.model import DeCapDecoder
from decapflow.decoder.vocab import Vocab
from decapflow.encoders import Encoder, load_encoder

#: Banks at least this large use the LanceDB ANN index for ``topk`` (built on first use; ``decapflow memory index``
#: builds it ahead); smaller ones take their exact top-k from the local vector copy, which is fast enough and exact.
ANN_MIN_ROWS = 200_000
#: ``auto`` projects banks at least this large onto each image's ``k`` nearest rows (``topk``), not the whole bank.
#: On a bank of distinct world sentences with real CLIP's modality gap (``benchmarks/big_world.py``), pd's softmax at
#: tau 0.01 spreads over thousands of rows (the heaviest weighs 0.001) and the decoder invents details from the
#: blend: CIDEr 52.9 / 54.3 / 53.2 at 100k / 300k / 1M rows, against 86.3 / 102.4 / 125.8 for the top 64 rows
#: (attribute accuracy 82.5-82.6 against 84.5-87.2); at 10k rows the two are close (53.7 and 59.7, attributes equal).
TOPK_MIN_ROWS = 100_000
#: ``precision="auto"`` projects over a bfloat16 copy of banks whose float32 vectors take at least this many bytes
#: (4M rows at 512-d). The copy halves memory and bytes read and gives the same projection up to cosine 1e-5, but
#: widening it chunk by chunk costs time: 0.83x float32's speed for one image, 0.66x for 64 (1M rows, measured by
#: ``benchmarks/big_bank.py``). So it pays where the float32 copy would crowd RAM (6.2M rows: 12.7 GB vs 6.4 GB).
BF16_MIN_BYTES = 8 << 30


def bank_precision(bank: MemoryBank, precision: str = "auto") -> str:
    """``float32`` or ``bfloat16`` for the bank's local vector copy; ``auto`` picks by size (BF16_MIN_BYTES)."""
    if precision == "auto":
        return "bfloat16" if len(bank) * bank.dim * 4 >= BF16_MIN_BYTES else "float32"
    return precision


@dataclass
class Caption:
    caption: str
    strategy: str
    support: list[tuple[str, float]] = field(default_factory=list)  # (bank sentence, weight or similarity)
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The strategy "auto" picks: the best one the bank allows (:meth:`Captioner.default_strategy`).
AUTO = "auto"


@dataclass(frozen=True)
class Options:
    strategy: str = AUTO
    tau: float = 0.01
    k: int = 64  # neighbours for ``topk``
    beam: int = 1
    max_len: int = 30
    n_support: int = 3
    batch_size: int = 64
    #: A fused decoder's bank rows per image (None: as many as it was trained with) and what its query token is
    #: (``auto``: ms with a recorded image mean, else vd; see decapflow.caption.fused).
    neighbours: int | None = None
    query: str = "auto"


class Captioner:
    """Captions images against one memory bank with one decoder (``clipre`` needs no decoder)."""

    def __init__(self, encoder: Encoder, bank: MemoryBank, decoder: DeCapDecoder | None, vocab: Vocab | None,
                 options: Options | None = None, precision: str = "auto", projector: str = "auto") -> None:
        self.encoder, self.bank, self.decoder, self.vocab = encoder, bank, decoder, vocab
        self.options = self._checked(options or Options())
        if decoder is not None and decoder.config.prefix_dim != bank.dim:
            raise BankError(f"decoder expects {decoder.config.prefix_dim}-d prefixes, bank {bank.name!r} is "
                            f"{bank.dim}-d")
        self.bank_version = bank.version
        self.bank_ref = str(bank.ref)  # what the bank was opened as: NAME, NAME@TAG or NAME@vN
        self.precision = bank_precision(bank, precision)
        self.vectors, self.texts = bank.vector_cache(self.precision)  # memory-mapped, tied to the bank version
        #: How ``pd`` projects (device_projection.BACKENDS): on the decoder's device, through a DeviceBank on CUDA.
        where = decoder.device if decoder is not None else getattr(encoder, "device", "cpu")
        self.projector = BankProjector(self.vectors, where, projector)
        self.decoder_path: Path | None = None  # where the decoder came from, when loaded from a folder
        #: Bank rows this captioner sees (None: all of them); set by :meth:`restricted`.
        self.row_ids: np.ndarray | None = None
        #: The domain's mean image embedding, for ``ms`` and ``rerank`` (:mod:`decapflow.caption.modality`); for_bank loads
        #: the bank's recorded one.
        self.image_mean: modality.ImageMean | None = None
        self._text_mean: np.ndarray | None = None
        #: True on the copy that ``auto`` resolved to (:meth:`resolved`): it never builds an ANN index.
        self.auto = False

    @classmethod
    def for_bank(cls, ref: str | BankRef, options: Options | None = None, decoder: str | None = None,
                 store: str | None = None, device: str | None = None, precision: str = "auto",
                 projector: str = "auto") -> Captioner:
        """Open bank ``ref`` (``NAME``: its newest version; ``NAME@TAG`` / ``NAME@vN``: the version the tag or number
        pins), its encoder and the bank's current decoder (or ``decoder``: an id or a folder). The decoder and the
        image mean belong to the bank, whatever version is read. ``precision``: of the bank copy the strategies read
        (see :func:`bank_precision`); ``projector``: see :data:`~decapflow.caption.device_projection.BACKENDS`."""
        bank = Registry(store).open(ref)
        options = options or Options()
        device = default_device(device)  # the encoder, the decoder and pd on one device: cuda when present
        model = vocab = folder = None
        if options.strategy != "clipre":
            folder = resolve_decoder(bank.name, decoder, store=store)
            model, vocab, meta = load_decoder(folder, device)
            check_decoder_encoder(meta, folder, bank)
        captioner = cls(load_encoder(bank.encoder, device), bank, model, vocab, options, precision, projector)
        captioner.decoder_path = folder
        captioner.image_mean = modality.load_image_mean(bank.name, bank.encoder, store)
        return captioner

    def with_options(self, options: Options) -> Captioner:
        """The same loaded bank, encoder and decoder with other options (nothing is copied or reloaded)."""
        other = copy.copy(self)
        other.options = self._checked(options)
        return other

    def restricted(self, row_ids: Sequence[int] | np.ndarray) -> Captioner:
        """The same encoder, decoder and options over a subset of the bank: rows ``row_ids`` (bank row numbers,
        unique; kept in the order given). Every strategy that reads the bank (pd, topk, nnd, clipre) then sees only
        those rows and their sentences; topk searches them exactly, never the whole bank's ANN index; vd reads no
        bank. The subset's vectors are copied into memory (float32 rows, or bfloat16 bits for a bfloat16 copy)."""
        ids = np.asarray(row_ids, dtype=np.int64)
        rows = len(self.vectors)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"row_ids must be a non-empty 1-d list of bank rows, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= rows:
            raise ValueError(f"row_ids must lie in [0, {rows}) for a captioner over {rows} rows")
        if np.unique(ids).size != ids.size:
            raise ValueError("row_ids must not repeat a row")
        other = copy.copy(self)
        if isinstance(self.vectors, BF16Rows):
            other.vectors = BF16Rows(np.ascontiguousarray(self.vectors.bits[ids]))
        else:
            other.vectors = np.ascontiguousarray(self.vectors[ids], dtype=np.float32)
        other.texts = self.texts.take(ids)
        other.projector = self.projector.subset(other.vectors)
        other._text_mean = None
        other.row_ids = ids if self.row_ids is None else self.row_ids[ids]
        return other

    def _checked(self, options: Options) -> Options:
        if options.strategy not in (AUTO, *projection.STRATEGIES):
            raise ValueError(f"unknown strategy {options.strategy!r}; choose from {(AUTO, *projection.STRATEGIES)}")
        if self.decoder is None and options.strategy != "clipre":
            raise ValueError(f"strategy {options.strategy!r} needs a decoder")
        if options.query not in fused.QUERIES:
            raise ValueError(f"query must be one of {fused.QUERIES}, got {options.query!r}")
        if options.strategy == "fused":
            fused.require_fused(self)
        if options.neighbours is not None and self.decoder is not None and self.decoder.fused:
            fused.check_neighbours(self.decoder.config, options.neighbours)
        return options

    def default_strategy(self) -> str:
        """What ``auto`` runs: ``rerank`` when the bank has a recorded mean image embedding (it crosses the modality
        gap), else ``topk`` on banks of at least TOPK_MIN_ROWS rows, else DeCap's ``pd``; with a retrieval-fused
        decoder, ``rerank`` of its two queries (``ms`` and ``vd``, each decoded with the image's nearest rows) when
        the bank has the image mean, else ``fused``. Measured on two worlds (docs/guides/fused.md): that ``rerank``
        beat ``fused`` alone on plain and new compositions alike."""
        if self.image_mean is not None:
            return "rerank"
        if self.decoder is not None and self.decoder.fused:
            return "fused"
        return "topk" if self.big() else "pd"

    def big(self) -> bool:
        """Whether this bank is big enough for the top-k projection to beat the whole-bank one (TOPK_MIN_ROWS)."""
        return len(self.vectors) >= TOPK_MIN_ROWS

    def rerank_candidates(self) -> tuple[str, ...]:
        """``rerank``'s candidates: :data:`~decapflow.caption.modality.CANDIDATES`, with ``topk`` for ``pd`` on a big
        bank; with a retrieval-fused decoder :data:`~decapflow.caption.modality.FUSED_CANDIDATES`."""
        if self.decoder is not None and self.decoder.fused:
            return modality.FUSED_CANDIDATES
        return tuple("topk" if self.big() and c == "pd" else c for c in modality.CANDIDATES)

    def auto_reason(self) -> str:
        """Why ``auto`` runs what it runs, for a person."""
        name = self.bank.name
        rows = None if self.decoder is None or not self.decoder.fused else (
            f"{self.options.neighbours or self.decoder.config.neighbors} bank rows per image")
        if self.image_mean is not None:
            return (f"bank {name!r} has a recorded mean image embedding; candidates {', '.join(self.rerank_candidates())}"
                    + (f", decoded by its retrieval-fused decoder with {rows}" if rows else ""))
        if rows:
            return (f"bank {name!r}'s decoder is retrieval-fused and the bank has no mean image embedding: query "
                    f"{fused.query_name(self)}, {rows}; record one with 'decapflow memory image-mean {name} --images "
                    f"DIR' for rerank")
        hint = f"; record one with 'decapflow memory image-mean {name} --images DIR' for rerank"
        if self.big():
            how = ("its ANN index" if self.resolved().uses_index() else "exact" + (
                f"; 'decapflow memory index {name}' makes it faster" if len(self.vectors) >= ANN_MIN_ROWS else ""))
            return (f"bank {name!r} has {len(self.vectors):,} rows (>= {TOPK_MIN_ROWS:,}), top-{self.options.k} rows "
                    f"by {how}, and no mean image embedding{hint}")
        return f"bank {name!r} has no mean image embedding{hint}"

    @property
    def strategy(self) -> str:
        """The strategy that runs (``auto`` resolved)."""
        return self.default_strategy() if self.options.strategy == AUTO else self.options.strategy

    def resolved(self) -> Captioner:
        """This captioner with ``auto`` replaced by the strategy it stands for."""
        if self.options.strategy != AUTO:
            return self
        other = self.with_options(replace(self.options, strategy=self.default_strategy()))
        other.auto = True
        return other

    @property
    def text_mean(self) -> np.ndarray:
        """The mean bank embedding (``mu_txt``; one pass over the bank copy, then cached)."""
        if self._text_mean is None:
            self._text_mean = modality.rows_mean(self.vectors)
        return self._text_mean

    def _shifted(self, image_vectors: np.ndarray) -> np.ndarray:
        if self.image_mean is None:
            raise BankError(f"strategy {self.options.strategy!r} needs the mean image embedding of the domain; record "
                            f"it once with: decapflow memory image-mean {self.bank.name} --images DIR (images of the "
                            f"kind you caption, no captions needed)")
        return modality.mean_shift(image_vectors, self.image_mean.vector, self.text_mean)

    @property
    def decoder_id(self) -> str | None:
        return self.decoder_path.name if self.decoder_path else None

    # ------------------------------------------------------------------ the pipeline
    def caption(self, images: Sequence) -> list[Caption]:
        """PIL images (or preprocessed tensors) -> captions, in order."""
        with cpu.claim():  # one share of the machine's CPUs for the whole call (decapflow.cpu)
            return self.caption_embeddings(self.encoder.encode_image(images, self.options.batch_size))

    def caption_embeddings(self, image_vectors: np.ndarray) -> list[Caption]:
        """Unit CLIP image embeddings [B, D] -> captions (everything after the image encoder)."""
        with cpu.claim():
            return self._caption_embeddings(image_vectors)

    def _caption_embeddings(self, image_vectors: np.ndarray) -> list[Caption]:
        if self.options.strategy == AUTO:
            return self.resolved()._caption_embeddings(image_vectors)
        o = self.options
        if o.strategy == "clipre":
            ids, sims = projection.nearest(image_vectors, self.vectors, k=o.n_support)
            return [Caption(self._text(row[0]), "clipre", self._support(row, s)) for row, s in zip(ids, sims, strict=True)]
        if o.strategy == "rerank":
            return self._rerank(image_vectors)
        prefixes, support = self.prefixes(image_vectors)
        texts = self._decode(prefixes, image_vectors)
        return [Caption(text, o.strategy, sup) for text, sup in zip(texts, support, strict=True)]

    def _decode(self, prefixes: np.ndarray, image_vectors: np.ndarray) -> list[str]:
        """Decode prefixes [C*B, D] of ``image_vectors`` [B, D] (C candidates per image, candidate-major); a fused
        decoder also reads each image's nearest bank rows."""
        o = self.options
        candidates = len(prefixes) // len(np.atleast_2d(image_vectors))
        near, prompt = fused.neighbours(self, image_vectors).tiled(candidates) if self.decoder.fused else (None, None)
        return self.decoder.decode_texts(prefixes, self.vocab, max_len=o.max_len, beam=o.beam,
                                         batch_size=max(o.batch_size, 1) * candidates, neighbours=near, prompt=prompt)

    def prefixes(self, image_vectors: np.ndarray) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        """The strategy's decoder prefixes [B, D] and, per image, the bank sentences behind them (not for
        ``rerank``, which decodes several candidates per image)."""
        if self.options.strategy == AUTO:
            return self.resolved().prefixes(image_vectors)
        o = self.options
        if o.strategy in ("rerank", "clipre"):
            raise ValueError(f"strategy {o.strategy!r} has no single prefix per image")
        if o.strategy == "fused":  # the query's prefix; the support: the bank rows the decoder reads beside it
            query = self.with_options(replace(o, strategy=fused.query_name(self))).prefixes(image_vectors)[0]
            return query, fused.neighbours(self, image_vectors).support(o.n_support)
        if o.strategy == "pd":
            p = self.projector.project(image_vectors, tau=o.tau, n_support=o.n_support)
            return p.vectors, [self._support(i, w) for i, w in zip(p.support_ids, p.support_weights, strict=True)]
        if o.strategy == "topk":
            return self._topk(image_vectors)
        ids, sims = projection.nearest(image_vectors, self.vectors, k=o.n_support)
        support = [self._support(i, s) for i, s in zip(ids, sims, strict=True)]
        if o.strategy == "nnd":
            return np.asarray(self.vectors[ids[:, 0]], dtype=np.float32), support
        if o.strategy == "ms":
            return self._shifted(image_vectors), support
        return projection.identity(image_vectors), support  # vd

    def candidate_prefixes(self, image_vectors: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """Prefixes [B, D] of the named rerank candidates (:data:`~decapflow.caption.modality.CANDIDATES`):
        ``pd`` (``pd@TAU`` for another temperature), ``topk``, ``nnd``, ``ms``, ``vd`` and blends ``pd+msW``."""
        o = self.options
        image_vectors = np.atleast_2d(image_vectors)
        made: dict[str, np.ndarray] = {}

        def get(name: str) -> np.ndarray:
            if name not in made:
                if name == "pd" or name.startswith("pd@"):
                    tau = float(name[3:]) if name.startswith("pd@") else o.tau
                    made[name] = self.projector.project(image_vectors, tau=tau, n_support=0).vectors
                elif name == "topk":
                    made[name] = self._topk(image_vectors)[0]
                elif name == "nnd":
                    ids, _ = projection.nearest(image_vectors, self.vectors, k=1)
                    made[name] = np.asarray(self.vectors[ids[:, 0]], dtype=np.float32)
                elif name == "ms":
                    made[name] = self._shifted(image_vectors)
                elif name == "vd":
                    made[name] = projection.identity(image_vectors)
                elif name == "fused":
                    made[name] = get(fused.query_name(self))
                elif name.startswith("pd+ms"):
                    made[name] = modality.blend(get("pd"), get("ms"), float(name[5:]))
                else:
                    raise ValueError(f"unknown rerank candidate {name!r}")
            return made[name]

        return [get(name) for name in names]

    def _rerank(self, image_vectors: np.ndarray, names: Sequence[str] | None = None) -> list[Caption]:
        """Decode the candidate prefixes of every image in one batched decode ([C x B] prefixes), embed the distinct
        captions with the CLIP text encoder, keep per image the caption closest to the image."""
        o = self.options
        names = list(names or self.rerank_candidates())
        image_vectors = np.atleast_2d(image_vectors)
        decoded = [n for n in names if n != "clipre"]  # clipre: the nearest bank sentence, its embedding stored
        prefixes = self.candidate_prefixes(image_vectors, decoded)
        batch, count = len(image_vectors), len(prefixes)
        texts = self._decode(np.concatenate(prefixes), image_vectors)
        by_image = [[texts[c * batch + b] for c in range(count)] for b in range(batch)]  # [B][C]
        distinct = sorted({t for row in by_image for t in row})
        embedded = dict(zip(distinct, self.encoder.encode_text(distinct), strict=True))
        candidates = np.stack([[embedded[t] for t in row] for row in by_image])  # [B, C, D]
        if "clipre" in names:
            ids, _ = projection.nearest(image_vectors, self.vectors, k=1)
            nearest = np.asarray(self.vectors[ids[:, 0]], dtype=np.float32)[:, None]
            at = names.index("clipre")
            candidates = np.concatenate([candidates[:, :at], nearest, candidates[:, at:]], axis=1)
            for row, i in zip(by_image, ids[:, 0], strict=True):
                row.insert(at, self._text(i))
        best, scores = modality.rerank(image_vectors, candidates)
        return [Caption(row[i], "rerank", [(f"{names[c]}: {row[c]}", round(float(s[c]), 4))
                                           for c in np.argsort(-s)[: o.n_support]])
                for row, i, s in zip(by_image, best, scores, strict=True)]

    def uses_index(self) -> bool:
        """Whether ``topk`` (and a fused decoder's retrieval) takes its neighbours from an index: on banks of
        ANN_MIN_ROWS rows or more (not a restricted subset: an index covers the whole bank) that have one (this
        version's in-process IVF, or LanceDB's), or when ``topk`` was asked for by name (it then builds the IVF on
        first use). ``auto`` never builds one: without it, the exact top-k costs what ``pd`` costs."""
        if len(self.vectors) < ANN_MIN_ROWS or self.row_ids is not None:
            return False
        return (self.bank.has_ivf(self.precision) or self.bank.has_index()
                or (self.options.strategy == "topk" and not self.auto))

    def _topk(self, image_vectors: np.ndarray) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        o = self.options
        indexed = self.uses_index()
        index = self.bank.ivf(self.precision, build=not self.auto) if indexed else None
        if index is not None or not indexed:  # the in-process IVF's rows, or the exact top-k
            ids = (index.search(image_vectors, o.k)[0] if index is not None
                   else projection.nearest(image_vectors, self.vectors, k=o.k)[0])
            p = projection.project_subset(image_vectors, self.vectors, tau=o.tau, neighbor_ids=ids,
                                          n_support=o.n_support)
            return p.vectors, [self._support(i, w) for i, w in zip(p.support_ids, p.support_weights, strict=True)]
        # auto on a bank with LanceDB's index but no IVF for this version yet: LanceDB's search
        vectors, texts = self.bank.ann_neighbors(image_vectors, o.k)  # [B, k, D], [B][k]
        batch, k, dim = vectors.shape
        ids = np.arange(batch * k).reshape(batch, k)
        ids[np.array([[t == "" for t in row] for row in texts])] = -1  # padding when the index found < k
        p = projection.project_subset(image_vectors, vectors.reshape(-1, dim), tau=o.tau, neighbor_ids=ids,
                                      n_support=o.n_support)
        flat = [t for row in texts for t in row]
        support = [[(flat[i], float(w)) for i, w in zip(r, ws, strict=True) if i >= 0]
                   for r, ws in zip(p.support_ids, p.support_weights, strict=True)]
        return p.vectors, support

    def _text(self, row: int) -> str:
        return self.texts[int(row)].as_py()

    def _support(self, ids: np.ndarray, weights: np.ndarray) -> list[tuple[str, float]]:
        return [(self._text(i), round(float(w), 4)) for i, w in zip(ids, weights, strict=True) if i >= 0]
