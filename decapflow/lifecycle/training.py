"""A bank's decoder, end to end: pin a bank version, leave out its evaluation set, train, register the result as a
challenger, decide (gated or by hand), and prune old decoders. What ``decapflow train`` and the Prefect flows run.

The arrays-in, checkpoint-out training loop is :func:`decapflow.decoder.train.train_decoder`; the promotion rule is
:func:`decapflow.lifecycle.gate.decide`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.refs import BankRef
from decapflow.config import default_device, home
from decapflow.decoder.checkpoint import register
from decapflow.decoder.distributed import Dist
from decapflow.decoder.model import DecoderConfig, load_config
from decapflow.decoder.recipe import FUSED_RECIPE, fused_settings
from decapflow.decoder.registry import decoders
from decapflow.decoder.train import TrainRecipe, TrainResult, train_decoder
from decapflow.errors import BankError
from decapflow.lifecycle.gate import decide, held_out_texts, text_eval_set
from decapflow.lifecycle.stale import stale_rows
from decapflow.progress import Pulse

__all__ = ["runs_dir", "train_bank", "train_from_bank"]


def runs_dir(bank: str) -> Path:
    """Training runs of ``bank`` (checkpoints per epoch, metrics, plots): ``<home>/runs/<bank>/<run id>``."""
    return home() / "runs" / bank


def _pinned_bank(ref: str | BankRef, version: int | None = None, store: str | None = None) -> MemoryBank:
    """Bank ``ref`` pinned at the version training reads: ``version``, else the one ``ref`` names (``NAME@vN``, or
    ``NAME@TAG``'s version now), else the newest now. A ``version`` that disagrees with the reference's is refused."""
    ref = BankRef.parse(ref)
    bank = Registry(store).open(ref)  # UnknownBank / UnknownVersion, listing what exists
    if version is not None and ref.pinned and int(version) != bank.version:
        raise BankError(f"bank reference {str(ref)!r} names version {bank.version}, not {version}: give one of "
                        f"the two (e.g. {ref.name}@v{version}, or {str(ref)!r} without a version)")
    return bank.at(version)


def train_from_bank(
    bank_name: str | BankRef, *, config: DecoderConfig | str | Path = "decap-small",
    recipe: TrainRecipe | None = None, store: str | None = None, resume: bool = False, progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], Any] | None = None, version: int | None = None, promote: bool = True,
    pulse: Pulse | None = None, fused: bool | dict[str, Any] | None = None,
) -> tuple[str, TrainResult]:
    """Train a decoder on a memory bank's stored texts and vectors (no CLIP re-encoding) at bank ``version``
    (default: the version ``bank_name`` names, ``NAME@TAG`` or ``NAME@vN``, else the newest now; pinned for the
    whole run), leaving out the bank's held-out evaluation sentences. The decoder belongs to the bank (its plain
    name) and its meta records ``bank_version`` and ``bank_ref`` (the reference trained from). Registers the best
    checkpoint as a challenger whose parent is the current decoder, and makes it current when ``promote``
    (unconditionally; :func:`train_bank` can gate instead). ``resume`` continues the bank's latest run. ``pulse``
    gets the training's progress lines. ``fused`` (True, or ``{"neighbors": k, "fusion": ...}``) trains a
    retrieval-fused decoder (:mod:`decapflow.decoder.fusion`). Returns (decoder id, result)."""
    reg = decoders(store)
    ref = BankRef.parse(bank_name)
    bank = _pinned_bank(ref, version, store)
    bank_name = bank.name
    if len(bank) < 2:
        raise ValueError(f"bank {str(ref)!r} has {len(bank)} sentences at version {bank.version}; ingest a corpus "
                         f"first")
    evalset = text_eval_set(bank, store)
    held = held_out_texts(bank_name, store)
    vectors, texts = bank.vector_cache()  # memory-mapped: torchrun ranks share them through the page cache
    held_mask = pc.is_in(texts, value_set=pa.array(sorted(held), pa.string()))
    keep = np.flatnonzero(~np.asarray(held_mask, dtype=bool))  # row indices, not a copy of the rows
    root = runs_dir(bank_name)
    previous = sorted(p for p in root.glob("*") if (p / "last").is_dir()) if root.is_dir() else []
    if resume and not previous:
        raise ValueError(f"nothing to resume: bank {bank_name!r} has no training run under {root}")
    dist = Dist.from_env()  # under torchrun every rank runs this; rank 0 names the run and registers the result
    dist.setup(default_device((recipe or TrainRecipe()).device))
    name = str(previous[-1] if resume else root / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    out_dir = Path(dist.broadcast(name))
    arch = fused_settings(fused)
    name_of_config = str(config) if not isinstance(config, DecoderConfig) else "custom"
    if arch is not None:
        config = replace(config if isinstance(config, DecoderConfig) else load_config(config), **arch)
    meta = {"bank": bank_name, "bank_version": bank.version, "bank_ref": str(ref), "bank_rows": len(bank),
            "trained_rows": len(keep),
            "eval_set": evalset.id if evalset else None, "encoder": bank.encoder,
            "parent": reg.current_id(bank_name), "config": name_of_config, "fused": arch,
            "recipe": (recipe or TrainRecipe()).to_dict(), "run": str(out_dir)}
    result = train_decoder(texts, vectors, rows=keep, config=config, recipe=recipe, out_dir=out_dir,
                           resume=resume, progress=progress, on_epoch=on_epoch, meta=meta, pulse=pulse)
    if not dist.main:
        return "", result
    decoder_id = register(bank_name, result.best, make_current=promote, store=store)
    return decoder_id, result


def train_bank(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
               store: str | None = None, resume: bool = False, progress: bool = True, *, gate: bool = False,
               metric: str = "auto", margin: float = 0.0, version: int | None = None,
               keep_rejected: int = 5, pulse: Pulse | None = None,
               fused: bool | dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`train_from_bank` then :func:`~decapflow.lifecycle.gate.decide`, with plain data in and out (what the CLI
    and the Prefect tasks pass around). ``bank``: ``NAME``, ``NAME@TAG`` or ``NAME@vN`` (the version trained on;
    ``version`` may say it too, but must agree). ``gate``: promote only a challenger that beats the current decoder by
    ``margin`` on ``metric``; otherwise promote it (by hand) but still score and record it. Old rejected
    decoders beyond ``keep_rejected`` are deleted. ``fused``: a retrieval-fused decoder, with
    :data:`~decapflow.decoder.recipe.FUSED_RECIPE` under the recipe keys not given. Returns the decoder id, decision,
    training summary (recipe, device, bank version, final losses, tokens/s, the run folder and its loss curve),
    seconds."""
    start = time.perf_counter()
    ref = BankRef.parse(bank)
    bank = ref.name  # decoders, runs, evaluation sets and decisions belong to the bank, whatever version it read
    parsed = TrainRecipe.from_dict({**(FUSED_RECIPE if fused else {}), **(recipe or {})})
    decoder_id, result = train_from_bank(ref, config=config, recipe=parsed, store=store, resume=resume,
                                         progress=progress, version=version, promote=False, pulse=pulse, fused=fused)
    trained = time.perf_counter() - start
    if not decoder_id:  # a torchrun rank other than 0: rank 0 decides
        return {"bank": bank, "rank": Dist.from_env().rank, "history": result.history,
                "train_seconds": round(trained, 2), "seconds": round(time.perf_counter() - start, 2)}
    decision = decide(bank, decoder_id, gate=gate, metric=metric, margin=margin, store=store)
    pruned = decoders(store).prune(bank, keep_rejected=keep_rejected)
    last = result.history[-1] if result.history else {}
    seconds = sum(h["seconds"] for h in result.history)
    tokens = sum(h["tokens_per_s"] * h["seconds"] for h in result.history)
    return {"bank": bank, "ref": str(ref), "decoder": decoder_id, "promoted": decision.promoted,
            "decision": decision.to_dict(), "summary": decision.summary(), "pruned": pruned, "config": config, "recipe": parsed.to_dict(),
            "fused": fused_settings(fused), "device": str(default_device(parsed.device)),
            "bank_version": decision.bank_version,
            "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
            "tokens_per_s": tokens / seconds if seconds else None, "run": str(result.out_dir),
            "loss_plot": str(result.out_dir / "loss.png"), "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "steps": result.steps, "stopped_early": result.stopped_early,
            "history": result.history, "train_seconds": round(trained, 2),
            "seconds": round(time.perf_counter() - start, 2)}


def retrain_due(bank: str, store: str | None = None, min_new_rows: int = 1, min_growth: float | None = None
                ) -> tuple[bool, str]:
    """Whether ``bank`` has grown enough to train a challenger: by at least ``min_new_rows`` rows, or by at least
    the share ``min_growth``, since the last decoder trained on it (promoted or not: a rejected challenger is not
    retried on the same rows); or whether its current decoder learnt rows removed since (a removal or restore after
    the last training), whatever the growth."""
    attempts = [d for d in decoders(store).list(bank) if d.get("bank_version") is not None]
    memory = Registry(store).open(bank)
    if not attempts:
        return True, "the bank has no decoder yet"
    last = attempts[-1]
    if last["bank_version"] == memory.version:
        return False, f"decoder {last['id']} ({last['status']}) was trained on this bank version ({memory.version})"
    current = decoders(store).current_id(bank)
    stale = stale_rows(memory, store)
    if current in stale and last["bank_version"] < stale[current]["since"]:
        return True, (f"the current decoder {current} was trained on {stale[current]['rows']} rows since removed "
                      f"(at version {stale[current]['since']})")
    seen = int(last.get("bank_rows") or 0)
    new = len(memory) - seen
    if new >= min_new_rows:
        return True, f"{new} rows added since decoder {last['id']} was trained (at least {min_new_rows})"
    if min_growth is not None and seen and new / seen >= min_growth:
        return True, f"the bank grew by {new / seen:.1%} since decoder {last['id']} (at least {min_growth:.1%})"
    return False, (f"only {new} rows added since decoder {last['id']} was trained ({min_new_rows} rows"
                   + (f" or {min_growth:.1%}" if min_growth is not None else "") + " needed)")
