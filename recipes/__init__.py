"""Training recipes: ``pretrain.py`` (launched with ``accelerate launch``), ``compare.py``, and
the small modules they read (config, data, model, checkpoints, metrics)."""
