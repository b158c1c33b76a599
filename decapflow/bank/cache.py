"""A bank's fast local copy: its vectors as a memory-mapped .npy (float32, or bfloat16 bits) and its texts as a
memory-mapped Arrow file, written once per bank version under ``<home>/cache/banks/<name>-<bank id>/v<N>/``.
A mixin of :class:`~decapflow.bank.memory.MemoryBank`, which provides ``table``, ``name``, ``dim``, ``bank_id``,
``version`` and ``len()``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from decapflow.bank.rows import BF16Rows, vector_rows
from decapflow.config import cache_dir
from decapflow.errors import BankError

__all__ = ["PRECISIONS", "VectorCache", "cache_root"]

PRECISIONS = ("float32", "bfloat16")  # of a bank's local vector copy
CACHE_BATCH_ROWS = 65_536  # rows per batch when streaming a bank into its local copy (128 MiB at 512-d)


def cache_root(name: str, bank_id: str) -> Path:
    """Where bank ``name``'s local copies live, one folder per version (``v<N>``)."""
    return cache_dir() / "banks" / f"{name}-{bank_id}"


class VectorCache:
    """:meth:`vector_cache` over ``self.table``."""

    table: Any
    name: str
    dim: int
    bank_id: str
    version: int

    def vector_cache(self, precision: str = "float32") -> tuple[np.ndarray | BF16Rows, pa.Array]:
        """A fast local copy of this version's vectors (memory-mapped .npy) and texts (memory-mapped Arrow file).

        Reading a million vectors back out of LanceDB takes seconds; the copy is written once per bank version
        under ``<home>/cache`` and reused until the bank changes. It is streamed batch by batch (memory stays flat
        for any bank size). ``precision="bfloat16"`` gives a half-size copy (:class:`BF16Rows`) for projecting
        over big banks; training reads the float32 one."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        folder = cache_root(self.name, self.bank_id) / f"v{self.version}"
        vec_path = folder / ("vectors.npy" if precision == "float32" else "vectors.bf16.npy")
        text_path = folder / "texts.arrow"
        if not (vec_path.exists() and text_path.exists()):
            self._write_cache(folder, vec_path, None if text_path.exists() else text_path, precision)
        vectors = np.load(vec_path, mmap_mode="r")
        texts = pa.ipc.open_file(pa.memory_map(str(text_path))).read_all().column("text")
        return (BF16Rows(vectors) if precision == "bfloat16" else vectors), texts

    def _write_cache(self, folder: Path, vec_path: Path, text_path: Path | None, precision: str) -> None:
        """Stream the vectors (and texts, when ``text_path``) into temporary files, then rename them in place."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{uuid.uuid4().hex}"
        rows = len(self)
        dtype = np.float32 if precision == "float32" else np.uint16
        out = np.lib.format.open_memmap(f"{tmp}.npy", mode="w+", dtype=dtype, shape=(rows, self.dim))
        columns = ["vector"] + (["text"] if text_path else [])
        reader = self.table.search().select(columns).limit(None).to_batches(CACHE_BATCH_ROWS)
        writer = pa.ipc.new_file(f"{tmp}.arrow", pa.schema([("text", pa.string())])) if text_path else None
        start = 0
        for batch in reader:
            block = vector_rows(batch.column("vector"), self.dim)
            out[start : start + len(block)] = block if precision == "float32" else BF16Rows.encode(block)
            start += len(block)
            if writer is not None:
                writer.write_batch(pa.record_batch([batch.column("text")], names=["text"]))
        if writer is not None:
            writer.close()
        if start != rows:
            raise BankError(f"bank {self.name!r}: read {start} vectors, expected {rows}")
        out.flush()
        del out
        Path(f"{tmp}.npy").replace(vec_path)
        if text_path:
            Path(f"{tmp}.arrow").replace(text_path)
