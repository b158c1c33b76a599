"""Stage 3, captioning: images and videos -> CLIP embeddings -> a strategy's prefixes -> a decoder -> captions.

``captioner`` (a bank, an encoder and a decoder captioning batches, with support sentences), ``projection`` (the
strategies as pure array functions: DeCap's projection, top-k, nearest neighbour, visual), ``device_projection``
(the exact projection on a torch device: a bank held on the GPU in bfloat16, or streamed to it), ``decoders``
(which decoder captions a bank), ``modality`` (the image mean and the gap-aware ``ms``/``rerank``), ``images`` and
``video`` (reading media safely).

May import: stage 0 (config, errors, encoders), ``decapflow.bank``, ``decapflow.decoder`` and this package.
"""
