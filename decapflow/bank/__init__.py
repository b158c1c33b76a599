"""Stage 1, banks: corpora in, named and versioned memory banks out, on one store.

``store`` (the LanceDB database, leases and locks), ``memory`` (banks and the registry of a store), ``rows`` (the
float32 and bfloat16 layouts of a bank's vectors), ``corpus`` + ``textcheck`` (reading, cleaning and deduplicating
text files), ``ingest`` (read -> embed -> write in locked chunks), ``importer`` (precomputed embeddings),
``dask_embed`` (embedding on a Dask cluster), ``events`` (telling Prefect a bank grew).

May import: ``decapflow.config``, ``decapflow.errors``, ``decapflow.encoders`` and this package; nothing above.
"""
