"""Bytes of the frozen copy's weights, as loaded and with its matmul weights in half precision (what the
plugin holds under --precision amp/amp_bf16 with --diff-precision autocast, where that is exact).
No weights are downloaded: architectures only. `.venv/bin/python scripts/frozen_memory.py ViT-B-16 ViT-L-14`"""
import sys

import open_clip
import torch

from openclip_robust.teachers.frozen import frozen_copy


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


if __name__ == "__main__":
    print("| model | frozen copy, fp32 | matmul weights in bf16 | saved |\n|---|---|---|---|")
    for name in sys.argv[1:] or ["ViT-B-16"]:
        model = open_clip.create_model(name, pretrained=None)
        full, half = weight_bytes(model), weight_bytes(frozen_copy(model, torch.bfloat16))
        print(f"| {name} | {full / 2**20:.0f} MiB | {half / 2**20:.0f} MiB | {1 - half / full:.0%} |")
