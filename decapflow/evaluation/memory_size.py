"""The memory-size study: how caption scores grow with the size of the memory bank (DeCap's memory-size curve).

:func:`run_study` captions the same image embeddings against seeded random subsets of one bank, with the same
decoder, for each strategy, and scores every (size, strategy) pair; :func:`write_study` writes the table
(``memory-size.md`` / ``.json``) and :func:`plot_study` a PNG of each metric against memory size.

Subsets are **nested**: a size-n memory is the first n rows of one permutation of the bank drawn with ``seed``,
so the 1,000-row memory lies inside the 10,000-row one and the curve shows what adding rows does, not which rows
one draw happened to pick. The same seed gives the same rows. ``all`` is the whole bank through the unrestricted
captioner, so its row equals a plain ``decapflow eval`` exactly. A size at or above the bank's row count is
clipped to ``all`` (with a note). ``vd`` reads no bank: it is decoded once and drawn flat.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from decapflow.caption.captioner import Captioner
from decapflow.evaluation.evaluate import score_many

ALL = "all"
Size = int | str  # a row count, or ALL
#: Panels of the plot, in this order, for those the study computed.
PLOT_METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "attr-mean")
#: Columns of the markdown table (the JSON keeps every score).
TABLE_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "attr-mean")
#: Each panel of the plot is this many pixels (width, height); at most PLOT_COLUMNS panels a row.
PANEL_PX = (420, 340)
PLOT_COLUMNS = 3
DPI = 100


def parse_sizes(text: str) -> list[Size]:
    """``"1000,10000,all"`` -> ``[1000, 10000, "all"]``. Row counts are positive integers (``10k``, ``1m`` and
    ``1_000`` are understood); anything else raises ValueError saying which item is wrong."""
    sizes: list[Size] = []
    for raw in text.split(","):
        item = raw.strip().lower().replace("_", "")
        if item == ALL:
            sizes.append(ALL)
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1:], 1)
        digits = item[:-1] if scale > 1 else item
        if not digits.lstrip("-").isdigit():
            raise ValueError(f"{raw.strip()!r} is not a row count: give positive integers or 'all', "
                             "e.g. 1000,10000,100000,all")
        if int(digits) * scale < 1:
            raise ValueError(f"{raw.strip()!r}: a memory needs at least 1 row")
        sizes.append(int(digits) * scale)
    return sizes


@dataclass(frozen=True)
class SizePlan:
    label: str  # "1000", or "all"
    rows: int  # rows of the memory actually used


def plan_sizes(sizes: Iterable[Size], bank_rows: int) -> tuple[list[SizePlan], list[str]]:
    """Sizes resolved against a bank of ``bank_rows`` rows: ascending, each once. Sizes at or above the bank's
    row count become ``all``; the notes say so."""
    rows: dict[int, str] = {}
    notes = []
    for size in sizes:
        if size == ALL or int(size) >= bank_rows:
            if size != ALL and int(size) > bank_rows:
                notes.append(f"{size} rows > the bank's {bank_rows}: clipped to all")
            rows[bank_rows] = ALL
        else:
            rows[int(size)] = str(int(size))
    if not rows:
        raise ValueError("no memory sizes to study")
    return [SizePlan(label, n) for n, label in sorted(rows.items())], notes


def subset_order(bank_rows: int, seed: int) -> np.ndarray:
    """One seeded permutation of the bank's rows; a size-n memory is its first n entries (so sizes nest)."""
    return np.random.default_rng(seed).permutation(bank_rows)


def subset_rows(order: np.ndarray, rows: int) -> np.ndarray:
    """The rows of a size-``rows`` memory: a prefix of ``order``, sorted (a memory-mapped bank reads in order)."""
    return np.sort(order[:rows])


@dataclass
class SizeRun:
    strategy: str
    size: str  # the plan's label
    rows: int
    captions: dict[Any, str]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # projection + decoding (vd: its single decode)


@dataclass
class MemorySizeStudy:
    bank: str
    decoder: str | None
    bank_rows: int
    images: int
    seed: int
    runs: list[SizeRun]
    notes: list[str] = field(default_factory=list)

    def strategies(self) -> list[str]:
        return list(dict.fromkeys(run.strategy for run in self.runs))

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{strategy: {size label: metrics}}``, sizes ascending."""
        return {s: {r.size: r.metrics for r in self.runs if r.strategy == s} for s in self.strategies()}

    def to_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "decoder": self.decoder, "bank_rows": self.bank_rows, "images": self.images,
                "seed": self.seed, "notes": self.notes,
                "runs": [{k: v for k, v in asdict(run).items() if k != "captions"} for run in self.runs]}


def run_study(captioner: Captioner, references: Mapping[Any, list[str]], image_ids: Sequence[Any],
              vectors: np.ndarray, sizes: Iterable[Size], seed: int = 0, strategies: Sequence[str] = ("pd",),
              metrics: Iterable[str] | None = None,
              extra_scores: Callable[[dict[Any, str]], dict[str, float]] | None = None,
              full_bank: Mapping[str, tuple[Mapping[Any, str], float]] | None = None) -> MemorySizeStudy:
    """Caption ``vectors`` (unit CLIP image embeddings of ``image_ids``, in order) against nested seeded subsets
    of ``captioner``'s bank, per size and strategy, and score them (``metrics`` as in
    :func:`decapflow.evaluation.evaluate.score_captions`; ``extra_scores(captions)`` adds columns, e.g. attribute accuracy).
    ``full_bank``: ``{strategy: ({image_id: caption}, seconds)}`` already decoded with this captioner and these
    embeddings over the whole bank (e.g. by :func:`decapflow.evaluation.experiment.run_strategies`): reused for ``all``."""
    bank_rows = len(captioner.vectors)
    plans, notes = plan_sizes(sizes, bank_rows)
    order = subset_order(bank_rows, seed)
    runs: list[SizeRun] = []
    flat: dict[str, SizeRun] = {}  # vd, decoded once
    known = dict(full_bank or {})
    for plan in plans:
        memory = captioner if plan.label == ALL else None  # a subset is copied only when something decodes on it
        for strategy in strategies:
            if strategy in flat:
                runs.append(replace(flat[strategy], size=plan.label, rows=plan.rows))
                continue
            if strategy in known and (plan.label == ALL or strategy == "vd"):
                captions_by_id, seconds = known[strategy]
                run = SizeRun(strategy, plan.label, plan.rows, dict(captions_by_id), seconds=seconds)
                flat.update({strategy: run} if strategy == "vd" else {})
                runs.append(run)
                continue
            if memory is None:
                memory = captioner.restricted(subset_rows(order, plan.rows))
            t0 = time.perf_counter()
            captions = memory.with_options(replace(captioner.options, strategy=strategy)).caption_embeddings(vectors)
            run = SizeRun(strategy, plan.label, plan.rows, dict(zip(image_ids, (c.caption for c in captions),
                                                                      strict=True)), seconds=time.perf_counter() - t0)
            if strategy == "vd":
                flat[strategy] = run
            runs.append(run)
    scores = score_many(references, {n: run.captions for n, run in enumerate(runs)}, metrics=metrics)
    for n, run in enumerate(runs):
        run.metrics = {**scores[n], **(extra_scores(run.captions) if extra_scores else {})}
    if "vd" in strategies and len(plans) > 1:
        notes.append("vd reads no bank: decoded once, the same at every size")
    return MemorySizeStudy(captioner.bank.name, captioner.decoder_id, bank_rows, len(image_ids), seed, runs, notes)


def study_annotated_images(captioner: Captioner, annotations: Path, images_dir: Path, sizes: Iterable[Size],
                           seed: int = 0, strategies: Sequence[str] = ("pd",), metrics: Iterable[str] | None = None,
                           split: str | None = None, limit: int | None = None) -> tuple[MemorySizeStudy, list[Any]]:
    """Embed an annotated image set once (as ``decapflow eval`` does) and :func:`run_study` on it; also returns
    the images that could not be read."""
    from decapflow.evaluation.experiment import embed_annotated_images

    references, ids, vectors, failures = embed_annotated_images(captioner, annotations, images_dir, split, limit)
    study = run_study(captioner, references, ids, vectors, sizes, seed, strategies, metrics)
    return study, failures


# ------------------------------------------------------------------------------------------------ output


def _rows_label(rows: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if rows >= scale and rows % (scale // 10) == 0:
            return f"{rows / scale:g}{unit}"
    return str(rows)


def markdown(study: MemorySizeStudy) -> str:
    """Rows (strategy, memory size), columns the main metrics x100; the JSON keeps every score."""
    present = {key for run in study.runs for key in run.metrics}
    columns = [key for key in TABLE_METRICS if key in present]
    lines = ["| strategy | memory rows | " + " | ".join(columns) + " | images/s |",
             "|---|---:|" + "---:|" * (len(columns) + 1)]
    for run in study.runs:
        memory = f"all ({run.rows})" if run.size == ALL else str(run.rows)
        speed = f"{study.images / run.seconds:.0f}" if run.seconds else "–"
        cells = [f"{100 * run.metrics[key]:.1f}" if key in run.metrics else "–" for key in columns]
        lines.append(f"| {run.strategy} | {memory} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines) + "\n"


def plot_size(study: MemorySizeStudy) -> tuple[int, int]:
    """The PNG's (width, height) in pixels: PANEL_PX per metric panel, PLOT_COLUMNS panels a row."""
    panels = len(plot_metrics(study))
    columns = min(panels, PLOT_COLUMNS)
    return PANEL_PX[0] * columns, PANEL_PX[1] * math.ceil(panels / columns)


def plot_metrics(study: MemorySizeStudy) -> list[str]:
    present = {key for run in study.runs for key in run.metrics}
    return [key for key in PLOT_METRICS if key in present] or sorted(present)[:1]


def plot_study(study: MemorySizeStudy, path: str | Path) -> Path:
    """One PNG, one panel per metric (CIDEr, BLEU-4, METEOR, ROUGE-L, SPICE, attr-mean: those computed), scores
    x100 against memory rows on a log axis, one line per strategy. Size: :func:`plot_size`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    from matplotlib.figure import Figure

    metrics = plot_metrics(study)
    width, height = plot_size(study)
    columns = min(len(metrics), PLOT_COLUMNS)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(math.ceil(len(metrics) / columns), columns, squeeze=False).ravel()
    sizes = sorted({run.rows for run in study.runs})
    for ax, metric in zip(axes, metrics, strict=False):
        for strategy in study.strategies():
            runs = [r for r in study.runs if r.strategy == strategy and metric in r.metrics]
            ax.plot([r.rows for r in runs], [100 * r.metrics[metric] for r in runs], marker="o", label=strategy,
                    linestyle="--" if strategy == "vd" else "-")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [_rows_label(n) + ("\n(all)" if n == study.bank_rows else "") for n in sizes])
        ax.minorticks_off()
        ax.set_title(metric)
        ax.set_xlabel("memory rows (log)")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].set_ylabel("score x100")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"bank {study.bank} ({study.bank_rows} rows), decoder {study.decoder or '-'}, "
                 f"{study.images} images, subsets seed {study.seed}", fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def write_study(study: MemorySizeStudy, out_dir: str | Path, extra: Mapping[str, Any] | None = None,
                name: str = "memory-size") -> tuple[Path, Path, Path]:
    """Write ``<name>.json`` (every score, pycocoevalcap scale), ``<name>.md`` (the table) and ``<name>.png``
    (:func:`plot_study`) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    png_path = plot_study(study, out / f"{name}.png")
    payload = {**study.to_dict(), "extra": dict(extra or {})}
    json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    info = {"bank": f"{study.bank} ({study.bank_rows} rows)", "decoder": study.decoder, "images": study.images,
            "subsets": f"nested prefixes of one random permutation, seed {study.seed}", **(extra or {})}
    text = (f"# Memory size\n\nScores x100 (CIDEr x100 as in papers) against memory size.\n\n{markdown(study)}\n"
            + "".join(f"- **{key}**: {value}\n" for key, value in info.items())
            + "".join(f"- note: {note}\n" for note in study.notes) + f"\n![memory size]({png_path.name})\n")
    md_path.write_text(text, encoding="utf-8")
    return json_path, md_path, png_path

