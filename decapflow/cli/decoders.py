"""Commands for decoders: ``train`` and ``decoder list|use|import``."""

from __future__ import annotations

from pathlib import Path

import click

from decapflow.cli.banks import run_maybe_in_prefect
from decapflow.cli.base import Group, echo_json, json_option, main, store_option


# ---------------------------------------------------------------------------------------------- train
@main.command()
@click.option("--memory", "-m", required=True, help="The bank whose sentences the decoder learns.")
@click.option("--config", default="decap-small", show_default=True,
              help="Decoder architecture: decap-base (the paper's: 4 layers, width 768), decap-small, tiny, "
                   "or a JSON file.")
@click.option("--epochs", type=int, help="Passes over the bank (default 10).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Sentences per step (default 64; the paper: 128).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3; the paper's recipe uses 1e-5).")
@click.option("--paper", is_flag=True, help="The paper's recipe: lr 1e-5, 1,000 warm-up steps, 10 epochs, "
                                            "no early stopping (for COCO-sized banks on a GPU).")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Std of Gaussian noise on the prefix during training (CapDec-style); 0 = off.")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present; bf16 autocast on CUDA).")
@click.option("--threads", type=int, help="CPU threads for torch (on 2 busy cores 1 can beat 2).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data: same decoder.")
@click.option("--resume", is_flag=True, help="Continue the bank's latest training run from its last epoch.")
@click.option("--prefect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run as a Prefect flow: 'auto' when PREFECT_API_URL answers, 'on' always, 'off' never.")
@store_option
@json_option
def train(memory: str, config: str, epochs: int | None, max_steps: int | None, batch_size: int | None,
          lr: float | None, paper: bool, noise: float, device: str | None, threads: int | None, seed: int,
          resume: bool, prefect: str, store: str | None, as_json: bool) -> None:
    """Train a DeCap decoder on a memory bank, text only, and make it the bank's current decoder.

    The decoder learns to rebuild each sentence from its stored CLIP embedding (no CLIP needed). Defaults suit
    a CPU and a bank of ~20k short sentences (decap-small, lr 1e-3, early stopping: minutes); for COCO-sized
    banks on a GPU use --config decap-base --paper. Per-epoch metrics (JSON lines), a loss plot and
    checkpoints go to $DECAPFLOW_HOME/runs/BANK/.

    \b
    Example:  decapflow train --memory world --epochs 5
    """
    from decapflow.decoder.train import TrainRecipe

    base = TrainRecipe.paper() if paper else TrainRecipe()
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                                   "device": device, "num_threads": threads}.items() if v is not None}
    recipe = {**base.to_dict(), **overrides, "seed": seed, "noise_std": noise}
    result, overhead = run_maybe_in_prefect("train", prefect, bank=memory, config=config, recipe=recipe,
                                            store=store, resume=resume, progress=not as_json)
    if as_json:
        echo_json({**result, "prefect_seconds": overhead})
        return
    last = result["history"][-1] if result["history"] else {}
    click.echo(f"decoder {result['decoder']} is now current for bank {memory!r}: best epoch {result['best_epoch']}, "
               f"val loss {result['best_val_loss']:.3f}, val token accuracy {last.get('val_acc', float('nan')):.3f}, "
               f"{result['steps']} steps in {result['seconds']:.0f} s")


@main.group(cls=Group)
def decoder() -> None:
    """List, import and choose the decoders of a memory bank."""


@decoder.command("list")
@click.argument("memory")
@json_option
def decoder_list(memory: str, as_json: bool) -> None:
    """The decoders trained or imported for bank MEMORY (the current one is marked *)."""
    from decapflow.decoder.checkpoint import list_decoders

    rows = list_decoders(memory)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"bank {memory!r} has no decoder yet; train one with: decapflow train --memory {memory}")
    for r in rows:
        metrics = r.get("metrics") or {}
        loss = metrics.get("val_loss")
        click.echo(f"{'*' if r['current'] else ' '} {r['id']}  bank v{r.get('bank_version', '?')}  "
                   f"{r.get('config', r.get('source', ''))}  val loss {loss if loss is None else round(loss, 3)}")


@decoder.command("use")
@click.argument("memory")
@click.argument("decoder_id")
def decoder_use(memory: str, decoder_id: str) -> None:
    """Make DECODER_ID the current decoder of bank MEMORY."""
    from decapflow.decoder.checkpoint import set_current

    set_current(memory, decoder_id)
    click.echo(f"bank {memory!r} now captions with decoder {decoder_id}")


@decoder.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--memory", "-m", required=True, help="The bank to register it with.")
@click.option("--encoder", default="ViT-B-32:openai", show_default=True,
              help="The CLIP the checkpoint was trained with (must match the bank's).")
@store_option
def decoder_import(checkpoint: Path, memory: str, encoder: str, store: str | None) -> None:
    """Import an official DeCap checkpoint (a torch.save'd state_dict, loaded with weights_only=True)."""
    from decapflow.decoder.checkpoint import import_official, register
    from decapflow.memory import Registry

    registry = Registry(store)
    if registry.exists(memory):
        registry.open(memory).check_encoder(encoder)
    model, vocab, meta = import_official(checkpoint)
    decoder_id = register(memory, model, vocab, {**meta, "encoder": encoder, "bank": memory})
    click.echo(f"imported {checkpoint.name} as decoder {decoder_id} of bank {memory!r} (now current)")

