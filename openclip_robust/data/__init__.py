"""Data: reference stream, image-only target data, shard writers and prompt redraw."""
