"""Data: reference stream, image-only target data, shard writers and prompt redraw."""


def keep_workers(args, workers):
    """DataLoader's persistent_workers for the plugin's loaders: upstream's --persistent-workers where the line
    has the flag (a PR adds it on main), else upstream's own default for its webdataset loader (kept)."""
    return workers > 0 and bool(getattr(args, "persistent_workers", True))
