"""Small sample corpora and the synthetic offline world (``corpora.world``) with its tiny CLIP."""
