"""The embedded demo: small real data and a tiny open_clip model, offline."""
