"""Captioner: images -> CLIP image embeddings -> a strategy's prefix vectors -> decoder -> captions.

``Captioner(encoder, bank, decoder, vocab, strategy).caption(images)`` returns one :class:`Caption` per image with
the top supporting bank sentences and their weights, so a user sees why a caption came out. ``pd`` (and rerank's
``pd`` candidates) project with numpy on CPU and, when the decoder is on CUDA, through a bank copy held on the GPU
(:class:`~decapflow.caption.device_projection.BankProjector`, built on first use and shared by ``with_options``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from decapflow import cpu
from decapflow.bank.memory import BankError, MemoryBank, Registry
from decapflow.bank.rows import BF16Rows
from decapflow.caption import modality, projection
from decapflow.caption.decoders import check_decoder_encoder, resolve_decoder  # noqa: F401  (importable from here)
from decapflow.caption.device_projection import BankProjector
from decapflow.decoder.checkpoint import load_decoder
from decapflow.decoder.model import DeCapDecoder
from decapflow.decoder.vocab import Vocab
from decapflow.encoders import Encoder, load_encoder

#: Banks at least this large use the LanceDB ANN index for ``topk`` (built on first use; ``decapflow memory index``
#: builds it ahead); smaller ones take their exact top-k from the local vector copy, which is fast enough and exact.
ANN_MIN_ROWS = 200_000
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

    @classmethod
    def for_bank(cls, name: str, options: Options | None = None, decoder: str | None = None,
                 store: str | None = None, device: str | None = None, precision: str = "auto",
                 projector: str = "auto") -> Captioner:
        """Open bank ``name``, its encoder and its current decoder (or ``decoder``: an id or a folder).
        ``precision``: of the bank copy the strategies read (see :func:`bank_precision`); ``projector``: see
        :data:`~decapflow.caption.device_projection.BACKENDS`."""
        bank = Registry(store).open(name)
        options = options or Options()
        model = vocab = folder = None
        if options.strategy != "clipre":
            folder = resolve_decoder(name, decoder, store=store)
            model, vocab, meta = load_decoder(folder, device or "cpu")
            check_decoder_encoder(meta, folder, bank)
        captioner = cls(load_encoder(bank.encoder, device), bank, model, vocab, options, precision, projector)
        captioner.decoder_path = folder
        captioner.image_mean = modality.load_image_mean(name, bank.encoder, store)
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
        return options

    def default_strategy(self) -> str:
        """What ``auto`` runs: ``rerank`` when the bank has a recorded mean image embedding (it crosses the modality
        gap), else DeCap's ``pd``."""
        return "rerank" if self.image_mean is not None else "pd"

    @property
    def strategy(self) -> str:
        """The strategy that runs (``auto`` resolved)."""
        return self.default_strategy() if self.options.strategy == AUTO else self.options.strategy

    def resolved(self) -> Captioner:
        """This captioner with ``auto`` replaced by the strategy it stands for."""
        if self.options.strategy != AUTO:
            return self
        return self.with_options(replace(self.options, strategy=self.default_strategy()))

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
        texts = self.decoder.decode_texts(prefixes, self.vocab, max_len=o.max_len, beam=o.beam,
                                          batch_size=max(o.batch_size, 1))
        return [Caption(text, o.strategy, sup) for text, sup in zip(texts, support, strict=True)]

    def prefixes(self, image_vectors: np.ndarray) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        """The strategy's decoder prefixes [B, D] and, per image, the bank sentences behind them (not for
        ``rerank``, which decodes several candidates per image)."""
        if self.options.strategy == AUTO:
            return self.resolved().prefixes(image_vectors)
        o = self.options
        if o.strategy in ("rerank", "clipre"):
            raise ValueError(f"strategy {o.strategy!r} has no single prefix per image")
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
        ``pd`` (``pd@TAU`` for another temperature), ``nnd``, ``ms``, ``vd`` and blends ``pd+msW``."""
        o = self.options
        image_vectors = np.atleast_2d(image_vectors)
        made: dict[str, np.ndarray] = {}

        def get(name: str) -> np.ndarray:
            if name not in made:
                if name == "pd" or name.startswith("pd@"):
                    tau = float(name[3:]) if name.startswith("pd@") else o.tau
                    made[name] = self.projector.project(image_vectors, tau=tau, n_support=0).vectors
                elif name == "nnd":
                    ids, _ = projection.nearest(image_vectors, self.vectors, k=1)
                    made[name] = np.asarray(self.vectors[ids[:, 0]], dtype=np.float32)
                elif name == "ms":
                    made[name] = self._shifted(image_vectors)
                elif name == "vd":
                    made[name] = projection.identity(image_vectors)
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
        names = list(names or modality.CANDIDATES)
        image_vectors = np.atleast_2d(image_vectors)
        decoded = [n for n in names if n != "clipre"]  # clipre: the nearest bank sentence, its embedding stored
        prefixes = self.candidate_prefixes(image_vectors, decoded)
        batch, count = len(image_vectors), len(prefixes)
        texts = self.decoder.decode_texts(np.concatenate(prefixes), self.vocab, max_len=o.max_len, beam=o.beam,
                                          batch_size=max(o.batch_size, 1) * count)
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

    def _topk(self, image_vectors: np.ndarray) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        o = self.options
        if len(self.vectors) < ANN_MIN_ROWS or self.row_ids is not None:  # the index covers the whole bank
            ids, _ = projection.nearest(image_vectors, self.vectors, k=o.k)
            p = projection.project_subset(image_vectors, self.vectors, tau=o.tau, neighbor_ids=ids,
                                          n_support=o.n_support)
            return p.vectors, [self._support(i, w) for i, w in zip(p.support_ids, p.support_weights, strict=True)]
        if not self.bank.has_index():
            self.bank.build_index()
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


def embed_paths(captioner: Captioner, paths: Sequence[Path], frames: int | None = None, progress: bool = False
                ) -> Iterator[tuple[list[Path], np.ndarray, list[Any]]]:
    """Image and video files in batches of ``options.batch_size``: (readable paths, their unit CLIP embeddings,
    failures). A video's embedding is the re-normalised mean of ``frames`` frames sampled uniformly over it."""
    from decapflow.caption.images import ImageFailure
    from decapflow.caption.video import DEFAULT_FRAMES, embed_media, load_media

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=f"caption ({captioner.strategy})", unit=" file", dynamic_ncols=True)
    step = max(1, captioner.options.batch_size)
    try:
        for start in range(0, len(paths), step):
            batch = paths[start : start + step]
            loaded = [(p, load_media(p, captioner.encoder, frames or DEFAULT_FRAMES, batch_size=step)) for p in batch]
            good = [(p, im) for p, im in loaded if not isinstance(im, ImageFailure)]
            failed = [im for _, im in loaded if isinstance(im, ImageFailure)]
            vectors = (embed_media(captioner.encoder, [im for _, im in good], step) if good
                       else np.zeros((0, captioner.bank.dim), np.float32))
            yield [p for p, _ in good], vectors, failed
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def caption_paths(captioner: Captioner, paths: Sequence[Path], progress: bool = False, frames: int | None = None,
                  image_mean: str | None = None) -> tuple[list[Caption], list[Any]]:
    """Caption image and video files in batches; unreadable ones are skipped and returned as failures.

    ``image_mean="batch"``: use the mean embedding of these files themselves as the domain's image mean (for
    ``ms``, ``rerank`` and ``auto``; transductive: every caption then depends on the whole batch). All files are
    embedded first, then captioned."""
    if image_mean not in (None, "batch"):
        raise ValueError(f"image_mean must be None or 'batch', not {image_mean!r}")
    captions: list[Caption] = []
    failures: list[Any] = []
    batches = embed_paths(captioner, paths, frames, progress)
    if image_mean == "batch":
        batches = list(batches)
        vectors = [v for _, v, _ in batches if len(v)]
        if vectors:
            mean = np.concatenate(vectors).astype(np.float64).mean(axis=0).astype(np.float32)
            captioner = copy.copy(captioner)
            captioner.image_mean = modality.ImageMean(mean, sum(map(len, vectors)), captioner.bank.encoder,
                                                      "the captioned files themselves (transductive)")
    for good, vectors, failed in batches:
        failures.extend(failed)
        if good:
            for path, cap in zip(good, captioner.caption_embeddings(vectors), strict=True):
                cap.image = str(path)
                captions.append(cap)
    return captions, failures


def caption_images(inputs: Sequence[str | Path], memory: str, strategy: str = AUTO, *, decoder: str | None = None,
                   store: str | None = None, device: str | None = None, frames: int | None = None,
                   errors: str = "raise") -> list[Caption]:
    """Caption image and video files against bank ``memory`` with ``strategy`` (see
    :data:`decapflow.caption.projection.STRATEGIES`) and the bank's current decoder (or ``decoder``: an id or a
    checkpoint folder). ``inputs``: files, folders (searched recursively) or glob patterns. One
    :class:`Caption` per readable file, in input order. ``errors``: ``"raise"`` (a ValueError naming every
    unreadable file, after the others were captioned) or ``"skip"`` (leave them out). For many calls, build one
    :class:`Captioner` with :meth:`Captioner.for_bank` and use :func:`caption_paths`: this loads the bank copy,
    the encoder and the decoder each time."""
    from decapflow.caption.images import collect_paths
    from decapflow.caption.video import MEDIA_SUFFIXES

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    paths = collect_paths(inputs, MEDIA_SUFFIXES)
    captioner = Captioner.for_bank(memory, Options(strategy=strategy), decoder=decoder, store=store, device=device)
    captions, failures = caption_paths(captioner, paths, frames=frames)
    if failures and errors == "raise":
        listed = "; ".join(f"{f.path}: {f.reason}" for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise ValueError(f"{len(failures)} of {len(paths)} files could not be read: {listed}{more}")
    return captions
