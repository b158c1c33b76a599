"""``decapflow serve``: captioning over HTTP against any registered memory bank.

``app`` (routes), ``gate`` (API key, metrics, upload limit), ``inputs`` (reading requests), ``errors`` (the one
error shape), ``batcher`` (micro-batching), ``worker`` (the compute process), ``pool`` (warm captioners with hot
reload), ``metrics`` (Prometheus), ``client`` (``decapflow caption --server``), ``static/`` (the page).
"""
