"""The world CLIPs' artefact docs: ``corpora/world/REPORT.md`` (every model side by side, then one section per
model on how it was trained) and ``README.md``. Written by ``corpora/train_world_clip.py`` after training."""

from __future__ import annotations

import json
import re
from pathlib import Path

from corpora import world

REPORT_TITLE = "# The world CLIPs: training reports"


def write_report(path: Path, config: dict, facts: dict, metrics: dict, others: dict[str, dict] | None = None) -> None:
    """REPORT.md: a side-by-side table of every world CLIP's held-out quality (``others``: the metrics of the
    other shipped models), then one section per model on how it was trained. Only this model's section is
    rewritten; the others' sections (between ``<!-- NAME -->`` markers) are kept as they are."""
    name, n = facts["name"], metrics["n"]
    attr = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
    losses = ", ".join(f"{s}: {loss:.3f}" for s, loss, _ in facts["log"][:: max(1, len(facts["log"]) // 8)])
    fixed = facts["args"].get("fixed_logit_scale", "None")
    scale = f"logit scale fixed at {float(fixed):g}" if fixed != "None" else "logit scale learnt (init 1/0.07, clamped at 100)"
    if facts["args"].get("cone_init", "None") != "None":
        scale += ", last biases of the text/image towers drawn from N(0, std^2) with std " + facts["args"]["cone_init"]
    if float(facts["args"].get("label_smoothing", 0)):
        scale += f", label smoothing {facts['args']['label_smoothing']}"
    lines = [
        f"## {name}: training report",
        "",
        f"Command: `{facts['command']}` (written by the script itself).",
        f"Training: {facts['train_seconds']} s wall on 1 CPU thread ({facts['args']['steps']} steps x batch "
        f"{facts['args']['batch_size']}, AdamW lr {facts['args']['lr']}, warm-up + cosine, seed {facts['args']['seed']}, "
        f"{scale}); pairs rendered on the fly from split CLIP_TRAIN_SEED={world.CLIP_TRAIN_SEED}.",
        f"Loss (step: mean loss): {losses}.",
        f"Parameters: {facts['params']:,} ({facts['vision_params']:,} vision; the 49,408-token embedding is most of "
        f"the rest). Weights: `{name}.safetensors`, float16, {facts['weights_bytes'] / 1e6:.2f} MB; reloading it "
        f"with `open_clip.create_model_and_transforms` changes text embeddings by at most "
        f"{facts['reload_max_abs_diff']:.1e}.",
        f"Config: `{json.dumps(config)}`",
        f"Corpus: `corpus.txt.gz`, {facts['corpus_lines']:,} lines ({facts['corpus_distinct']:,} distinct), "
        f"one caption per scene of split CORPUS_SEED={world.CORPUS_SEED}.",
        "",
        f"### Held-out quality ({n} scene/caption pairs of split HELDOUT_SEED={world.HELDOUT_SEED}; float16 weights)",
        "",
        "A retrieved caption counts as right when its scene has the same attributes as the query's "
        f"(chance ~{1 / n:.3f} for top-1).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| image->text top-1 among {n} | {metrics['i2t_top1']:.3f} |",
        f"| image->text top-5 among {n} | {metrics['i2t_top5']:.3f} |",
        f"| text->image top-1 among {n} | {metrics['t2i_top1']:.3f} |",
        f"| modality gap: norm(mean unit image emb - mean unit text emb) | {metrics['gap']:.3f} |",
        f"| mean cosine of matched pairs | {metrics['pair_cos']:.3f} |",
        f"| mean cosine of unmatched pairs | {metrics['nonpair_cos']:.3f} |",
        "",
        "Attribute accuracy (`corpora.world.attribute_accuracy`: multiset F1 per attribute, `object` = whole "
        "groups right, `mean` = mean of colour/shape/count/size) of the caption an image retrieves:",
        "",
        f"- top-1 among the {n} held-out captions: {attr(metrics['i2t_attr'])}",
        f"- nearest corpus sentence to the image embedding: {attr(metrics['corpus_nn'])}",
        f"- nearest corpus sentence to its DeCap projection onto the corpus (tau 0.01): {attr(metrics['corpus_proj'])}",
        "",
    ]
    sections = _report_sections(path.read_text() if path.is_file() else "")
    sections[name] = "\n".join(lines)
    models = {**(others or {}), name: metrics}
    text = [REPORT_TITLE, "", side_by_side(models), ""]
    for model in sorted(sections):
        text += [f"<!-- {model} -->", sections[model].strip("\n"), f"<!-- /{model} -->", ""]
    path.write_text("\n".join(text))


def _report_sections(text: str) -> dict[str, str]:
    """The per-model sections of an existing REPORT.md: {name: text between <!-- name --> and <!-- /name -->}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- ([\w.-]+) -->\n(.*?)<!-- /\1 -->", text, re.S)}


def side_by_side(models: dict[str, dict]) -> str:
    """The held-out quality of every model as one markdown table (a column per model)."""
    names = sorted(models)
    first = models[names[0]]
    rows = [
        (f"image->text top-1 among {first['n']}", "i2t_top1"), (f"image->text top-5 among {first['n']}", "i2t_top5"),
        (f"text->image top-1 among {first['n']}", "t2i_top1"),
        ("modality gap: norm(mean unit image emb - mean unit text emb)", "gap"),
        ("mean cosine of matched pairs", "pair_cos"), ("mean cosine of unmatched pairs", "nonpair_cos"),
    ]
    attrs = [("attribute accuracy (mean / object) of the top-1 held-out caption", "i2t_attr"),
             ("... of the nearest corpus sentence to the image", "corpus_nn"),
             ("... of the nearest corpus sentence to its DeCap projection (tau 0.01)", "corpus_proj")]
    out = [f"Held-out quality ({first['n']} scene/caption pairs of split HELDOUT_SEED={world.HELDOUT_SEED}, float16 "
           "weights; each model's section below says how it was trained and defines the metrics).", "",
           "| metric | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(f"{models[n][key]:.3f}" for n in names) + " |" for label, key in rows]
    out += [f"| {label} | " + " | ".join(f"{models[n][key]['mean']:.3f} / {models[n][key]['object']:.3f}"
                                         for n in names) + " |" for label, key in attrs]
    return "\n".join(out)


def write_readme(path: Path) -> None:
    """README.md of the artefact folder."""
    path.write_text(
        """# corpora/world: the synthetic offline world

Generated by `corpora/train_world_clip.py`; the world itself (scenes, rendering, captions, metric) is
`corpora/world.py`.

- `world-clip.json`: open_clip model config (model name `world-clip`, the file's stem; CLIP BPE tokenizer).
- `world-clip.safetensors`: its weights (float16). Load offline with `open_clip.add_model_config(json)` then
  `open_clip.create_model_and_transforms("world-clip", pretrained=safetensors_path)`, or the encoder spec `world`.
  Its modality gap is tiny (0.08; real CLIP's is ~0.8).
- `world-clip-gap.json`, `world-clip-gap.safetensors`: the same architecture trained to keep a real-CLIP-sized
  modality gap (0.83: a narrow cone per tower at initialisation, logit scale fixed at 300); encoder spec
  `world-gap`, the one `decapflow demo` uses.
- `corpus.txt.gz`: the text corpus, one caption per line (split CORPUS_SEED; duplicates kept).
- `REPORT.md`: both models side by side, then each one's training command, time, size and held-out quality.

Regenerate (each about 6-10 minutes on one quiet CPU core, 20 on a busy one; deterministic for a given torch
build):
`HF_HUB_OFFLINE=1 python -m corpora.train_world_clip --out corpora/world` and
`HF_HUB_OFFLINE=1 python -m corpora.train_world_clip --out corpora/world --name world-clip-gap --fixed-logit-scale 300 --cone-init 4,2`.
Test/demo images are not stored: `corpora.world.write_image_set(folder, n)` renders them (split TEST_SEED).
"""
    )
