"""Stage 4, evaluation: scoring captions and comparing strategies.

``evaluate`` (COCO metrics: BLEU, METEOR, ROUGE-L, CIDEr, SPICE where it runs), ``experiment`` (strategies side by
side on one annotated image set), ``memory_size`` (captions against nested subsets of a bank), ``results`` (caption
output formats: text, jsonl, COCO).

May import: stage 0, ``decapflow.bank``, ``decapflow.decoder``, ``decapflow.caption`` and this package.
"""
