"""CPU miniature of the DiVE paper's experiment on real offline data (see the README's miniature section)."""


def model_a(out="runs/miniature", quick=False, rebuild=False):
    """(local-dir folder, weights file) of model A, the LiT-aligned EfficientNet-Lite0 + MiniLM CLIP."""
    from openclip_robust.miniature.experiment import model_a as build
    return build(out, quick, rebuild)
