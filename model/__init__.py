"""Networks and their checkpoint formats (torch, open_clip, numpy only; nothing of Zarr)."""
