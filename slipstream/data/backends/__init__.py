"""Data-plane backends: where source loaders run. `local` is a pool inside the trainer."""
