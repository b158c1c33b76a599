"""Stage 5, lifecycle: a bank's decoder from training to retirement, above captioning and evaluation.

``training`` (pin a bank version, train, register a challenger, gate, prune), ``gate`` (fixed evaluation sets and
the champion/challenger rule; it captions and scores, so it sits above both), ``deletion`` (a bank with its
decoders, evaluation sets and image mean), ``demo`` (the whole pipeline on the shipped synthetic world).

May import: every stage below (0-4) and this package; the shells (``serve``, ``cli``, ``flows``) call it.
"""
