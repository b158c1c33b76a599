"""Commands for decoders: ``train`` and ``decoder list|promote|rollback|prune|import``."""

from __future__ import annotations

from pathlib import Path

import click

from decapflow.cli.banks import run_maybe_in_prefect
from decapflow.cli.base import THREADS_HELP, Group, echo_json, json_option, main, store_option
from decapflow.decoder.recipe import FUSED_CONFIG, FUSED_RECIPE  # no torch

GATE_METRICS = ("text.cider", "text.bleu4", "text.exact", "images.cider",
                "domain.clipscore")  # decapflow.lifecycle.gate.METRICS (no torch here)
SHOWN = ("cider", "bleu4", "exact", "clipscore")


# ---------------------------------------------------------------------------------------------- train
@main.command()
@click.option("--memory", "-m", required=True, metavar="BANK[@TAG|@vN]",
              help="The bank whose sentences the decoder learns: BANK at its newest version (pinned for the run), "
                   "BANK@TAG at the version a tag pins, BANK@vN at version N. The decoder records the version and "
                   "becomes a decoder of BANK.")
@click.option("--config", default="decap-small", show_default=True,
              help="Decoder architecture: decap-base (the paper's: 4 layers, width 768), decap-small, tiny, "
                   "or a JSON file.")
@click.option("--epochs", type=int, help="Passes over the bank (default 10).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Sentences per step (default 64; the paper: 128).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3; the paper's recipe uses 1e-5).")
@click.option("--paper", is_flag=True, help="The paper's recipe: lr 1e-5, 1,000 warm-up steps, 10 epochs, "
                                            "no early stopping (for COCO-sized banks on a GPU).")
@click.option("--noise-cos", type=click.FloatRange(0, 1, min_open=True),
              help="Prefix noise in training (CapDec-style, so the decoder tolerates where image embeddings land), "
                   "as the expected cosine between a noisy and a clean prefix, whatever the embedding width; "
                   "1 = off. Default: the recipe's.")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="The same noise as a per-dimension std (width-dependent; overrides --noise-cos); 0 = off.")
@click.option("--fused", is_flag=True,
              help="Train a retrieval-fused decoder: it also reads each sentence's nearest bank rows (retrieved with "
                   "noise, never the sentence itself), as images will meet them; captions then run --strategy "
                   "fused by default. See docs/guides/fused.md for when it pays.")
@click.option("--neighbors", type=click.IntRange(min=1), metavar="K",
              help=f"With --fused: bank rows per sentence (default {FUSED_CONFIG['neighbors']}).")
@click.option("--fusion", type=click.Choice(["tokens", "xattn"]),
              help=f"With --fused: tokens (the query and its K rows as K+1 prefix tokens) or xattn (one "
                   f"cross-attention layer into one token). Default {FUSED_CONFIG['fusion']}.")
@click.option("--retrieval-noise-cos", type=click.FloatRange(0, 1, min_open=True),
              help=f"With --fused: noise on a sentence's embedding when it retrieves its rows, as the cosine to the "
                   f"clean one (default {FUSED_RECIPE['retrieval_noise_cos']}).")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present; bf16 autocast on CUDA).")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data: same decoder.")
@click.option("--resume", is_flag=True, help="Continue the bank's latest training run from its last epoch.")
@click.option("--gate", is_flag=True,
              help="Make the new decoder current only if it beats the current one on the bank's evaluation set "
                   "(by --margin); otherwise it is kept as 'rejected'. Without --gate it becomes current anyway.")
@click.option("--metric", type=click.Choice(["auto", *GATE_METRICS]), default="auto", show_default=True,
              help="Gate metric. auto: images.cider when the bank has an annotated image set (captioned with the "
                   "default strategy); else domain.clipscore when it has unlabelled images ('memory image-mean': "
                   "CLIPScore of their captions); else text.cider (held-out sentences rebuilt from their own "
                   "embeddings).")
@click.option("--margin", type=float, default=0.0, show_default=True,
              help="How much the new decoder must beat the current one by on --metric.")
@click.option("--prefect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run as a Prefect flow: 'auto' when PREFECT_API_URL answers, 'on' always, 'off' never.")
@store_option
@json_option
def train(memory: str, config: str, epochs: int | None, max_steps: int | None, batch_size: int | None,
          lr: float | None, paper: bool, noise_cos: float | None, noise: float, fused: bool, neighbors: int | None,
          fusion: str | None, retrieval_noise_cos: float | None, device: str | None, threads: int | None, seed: int,
          resume: bool, gate: bool, metric: str, margin: float, prefect: str, store: str | None,
          as_json: bool) -> None:
    """Train a DeCap decoder on a memory bank, text only, and make it the bank's current decoder (with --gate:
    only if it is better than the current one).

    The decoder learns to rebuild each sentence from its stored CLIP embedding (no CLIP needed). Defaults suit
    a CPU and a bank of ~20k short sentences (decap-small, lr 1e-3, early stopping: minutes); for COCO-sized
    banks on a GPU use --config decap-base --paper. Per-epoch metrics (JSON lines), a loss plot and
    checkpoints go to $DECAPFLOW_HOME/runs/BANK/. The bank's evaluation sentences are held out; the new decoder
    is scored on them either way, and the scores are kept (decapflow decoder list BANK).

    \b
    Examples: decapflow train --memory world --epochs 5
              decapflow train --memory world --gate --margin 0.01
              decapflow train --memory world@v12        (trains on version 12)
              torchrun --nproc-per-node 2 -m decapflow.cli train --memory world --prefect off
                  (DistributedDataParallel: gloo on CPU, NCCL on GPU; --batch-size is per process)
    """
    from decapflow.decoder.train import TrainRecipe

    if not fused and (neighbors or fusion or retrieval_noise_cos):
        raise click.UsageError("--neighbors, --fusion and --retrieval-noise-cos go with --fused")
    base = TrainRecipe.paper() if paper else TrainRecipe()
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                                   "device": device, "num_threads": threads,
                                   "retrieval_noise_cos": retrieval_noise_cos}.items() if v is not None}
    recipe = {**base.to_dict(), **(FUSED_RECIPE if fused else {}), **overrides, "seed": seed}
    arch = {k: v for k, v in {"neighbors": neighbors, "fusion": fusion}.items() if v is not None}
    if noise:
        recipe.update(noise_std=noise, noise_cos=None)
    elif noise_cos is not None:
        recipe.update(noise_std=0.0, noise_cos=None if noise_cos == 1 else noise_cos)
    result, overhead = run_maybe_in_prefect("train", prefect, bank=memory, config=config, recipe=recipe,
                                            store=store, resume=resume, progress=not as_json, gate=gate,
                                            metric=metric, margin=margin, fused=(arch or True) if fused else None)
    if result.get("rank"):  # under torchrun, rank 0 reports
        return
    if as_json:
        echo_json({**result, "prefect_seconds": overhead})
        return
    last = result["history"][-1] if result["history"] else {}
    click.echo(f"trained decoder {result['decoder']} on bank {memory!r} (version {result['bank_version']}): "
               f"best epoch {result['best_epoch']}, "
               f"val loss {result['best_val_loss']:.3f}, val token accuracy {last.get('val_acc', float('nan')):.3f}, "
               f"{result['steps']} steps in {result['train_seconds']:.0f} s")
    click.echo(result["summary"])
    if result["pruned"]:
        click.echo(f"deleted {len(result['pruned'])} old rejected decoder(s): {', '.join(result['pruned'])}")


@main.group(cls=Group)
def decoder() -> None:
    """List, import and choose the decoders of a memory bank."""


@decoder.command("list")
@click.argument("memory")
@store_option
@json_option
def decoder_list(memory: str, store: str | None, as_json: bool) -> None:
    """The decoders of bank MEMORY, in the order registered: status (* current), bank version trained on,
    scores on the bank's evaluation sets, parent (the decoder current when it was trained) and recipe.

    A decoder trained on a bank version that held rows removed since (decapflow memory remove, or a restore) is
    marked "trained on N rows since removed": it may still write those sentences. Retrain it with
    'decapflow train --memory BANK --gate' (the retrain deployment does on the removal's event)."""
    from decapflow.bank.memory import Registry
    from decapflow.decoder.registry import list_decoders
    from decapflow.lifecycle.stale import stale_rows

    memory = _plain(memory, "decoder list")
    rows = list_decoders(memory, store)
    stale = stale_rows(Registry(store).open(memory), store) if rows and Registry(store).exists(memory) else {}
    for r in rows:
        r["stale_rows"] = stale.get(r["id"], {}).get("rows", 0)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"bank {memory!r} has no decoder yet; train one with: decapflow train --memory {memory}")
    for r in rows:
        recipe = r.get("recipe") or {}
        scores = "  ".join(f"{set_id}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items() if k in SHOWN)
                           for set_id, s in r["scores"].items()) or "not scored"
        noise = (f" noise cos {recipe['noise_cos']:g}" if recipe.get("noise_cos") is not None else
                 f" noise std {recipe['noise_std']:g}" if recipe.get("noise_std") else " no noise")
        decision = r.get("decision") or {}
        decided = (f"  decided by {decision['metric']} on {decision['eval_set']}" if decision else "")
        click.echo(f"{'*' if r['current'] else ' '} {r['id']}  {'current' if r['current'] else r['status']:<10}  "
                   f"bank v{r.get('bank_version', '?')}  {r.get('config', r.get('source', ''))}  "
                   f"parent {r['parent'] or '-'}  {scores}{decided}"
                   + (f"  recipe lr {recipe.get('lr')} epochs {recipe.get('epochs')}{noise}" if recipe else "")
                   + (f"  [trained on {r['stale_rows']:,} rows since removed]" if r["stale_rows"] else ""))


def _plain(memory: str, command: str) -> str:
    """A bank's plain name: decoders belong to a bank, not to one of its versions (``coco``, not ``coco@prod``)."""
    from decapflow.bank.refs import BankRef

    ref = BankRef.parse(memory)
    if ref.pinned:
        raise click.ClickException(f"{command} takes a bank's name: decoders belong to the bank, not to a version; "
                               f"give {ref.name!r}, not {memory!r}")
    return ref.name


def _bank_of(decoder_id: str, memory: str | None, store: str | None) -> tuple[str, str]:
    from decapflow.decoder.registry import decoders

    memory = _plain(memory, "--memory") if memory else memory
    return decoders(store).find(f"{memory}/{decoder_id}" if memory and "/" not in decoder_id else decoder_id,
                                memory or "")


@decoder.command("promote")
@click.argument("decoder_id")
@click.option("--memory", "-m", help="The bank (needed only when the id is registered with several).")
@store_option
def decoder_promote(decoder_id: str, memory: str | None, store: str | None) -> None:
    """Make DECODER_ID (an id, or BANK/ID) its bank's current decoder, by hand: no gate. The one it replaces
    stays registered; decapflow decoder rollback BANK brings it back."""
    from decapflow.decoder.registry import decoders

    bank, found = _bank_of(decoder_id, memory, store)
    decoders(store).set_current(bank, found, reason="promoted by hand")
    click.echo(f"bank {bank!r} now captions with decoder {found}")


@decoder.command("use", hidden=True)
@click.argument("memory")
@click.argument("decoder_id")
@store_option
@click.pass_context
def decoder_use(ctx: click.Context, memory: str, decoder_id: str, store: str | None) -> None:
    """Make DECODER_ID the current decoder of bank MEMORY (the old name of ``decoder promote``)."""
    ctx.invoke(decoder_promote, decoder_id=decoder_id, memory=memory, store=store)


@decoder.command("rollback")
@click.argument("memory")
@store_option
def decoder_rollback(memory: str, store: str | None) -> None:
    """Make the decoder that was current before the current one of bank MEMORY current again."""
    from decapflow.decoder.registry import decoders

    memory = _plain(memory, "decoder rollback")
    reg = decoders(store)
    before = reg.current_id(memory)
    now = reg.rollback(memory)
    click.echo(f"bank {memory!r} rolled back from decoder {before} to {now}")


@decoder.command("prune")
@click.argument("memory")
@click.option("--keep-rejected", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--keep-promoted", type=click.IntRange(min=0), default=5, show_default=True,
              help="Earlier current decoders kept (rollback can reach the ones kept).")
@store_option
def decoder_prune(memory: str, keep_rejected: int, keep_promoted: int, store: str | None) -> None:
    """Delete old decoders of bank MEMORY. Never the current one, nor undecided challengers."""
    from decapflow.decoder.registry import decoders

    memory = _plain(memory, "decoder prune")
    dropped = decoders(store).prune(memory, keep_rejected=keep_rejected, keep_promoted=keep_promoted)
    click.echo(f"deleted {len(dropped)} decoder(s) of bank {memory!r}" + (f": {', '.join(dropped)}" if dropped else ""))


@decoder.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--memory", "-m", required=True, help="The bank to register it with.")
@click.option("--encoder", default="ViT-B-32:openai", show_default=True,
              help="The CLIP the checkpoint was trained with (must match the bank's).")
@store_option
def decoder_import(checkpoint: Path, memory: str, encoder: str, store: str | None) -> None:
    """Import an official DeCap checkpoint (a torch.save'd state_dict, loaded with weights_only=True)."""
    from decapflow.bank.memory import Registry
    from decapflow.decoder.checkpoint import import_official, register

    memory = _plain(memory, "decoder import")
    registry = Registry(store)
    if registry.exists(memory):
        registry.open(memory).check_encoder(encoder)
    model, vocab, meta = import_official(checkpoint)
    decoder_id = register(memory, model, vocab, {**meta, "encoder": encoder, "bank": memory}, store=store)
    click.echo(f"imported {checkpoint.name} as decoder {decoder_id} of bank {memory!r} (now current)")

