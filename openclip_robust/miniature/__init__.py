"""CPU miniature of the DiVE paper's experiment on real offline data (see the README's miniature section)."""
from openclip_robust.miniature.experiment import model_a

__all__ = ["model_a"]  # the README's entry point: (local-dir folder, weights file) of model A, built if missing
