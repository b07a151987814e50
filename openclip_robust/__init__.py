"""openclip-robust: robust fine-tuning methods as a plugin for open_clip_train."""
__version__ = "0.1.0"
