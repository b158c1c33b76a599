"""The click group, its error handling and the options every command family shares."""

from __future__ import annotations

import json
from typing import Any

import click

from decapflow._version import __version__

EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RuntimeError, KeyError)


class Group(click.Group):
    """A click group that turns expected errors (bad input, missing bank, offline weights) into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except EXPECTED_ERRORS as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(message)) from exc


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


store_option = click.option(
    "--store", envvar="DECAPFLOW_STORE", default=None, metavar="URI",
    help="The store holding the banks and their decoders: a path or an object-store URI such as s3://bucket/prefix "
         "(credentials from the usual AWS_*/GOOGLE_* variables; default: $DECAPFLOW_HOME/banks).",
)
THREADS_HELP = ("CPU threads (torch and BLAS). Default: $DECAPFLOW_THREADS, else a fair share of the CPUs this "
                "process may use (affinity and cgroup quota), split with the other decapflow jobs running on the "
                "machine and re-read as they start and end.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="decapflow")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """decapflow: turn plain text into image captioners (DeCap, ICLR 2023).

    \b
    1. decapflow ingest corpus.txt --memory coco     text -> CLIP embeddings -> memory bank
    2. decapflow train --memory coco                 train a decoder on the bank, text only
    3. decapflow caption --memory coco photo.jpg     image -> projection onto the bank -> caption

    State lives under $DECAPFLOW_HOME (default ~/.decapflow). Offline? Use --encoder world, the tiny CLIP
    trained on decapflow's synthetic world, or a local CONFIG.json:WEIGHTS checkpoint.
    """
    ctx.ensure_object(dict)["debug"] = debug
