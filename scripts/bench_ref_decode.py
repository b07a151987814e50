"""Decode + eval-transform time per reference image, stored as is vs pre-resized by `make-ref-shards --resize 224`.

Six scikit-image photographs (300-1000 px, as JPEG q95), ViT-B-16's eval transform (224 px), one thread,
best of 5. Prints bytes per image and the time ratio: `.venv/bin/python scripts/bench_ref_decode.py`.
"""
import io
import time

import numpy as np
import torch
from PIL import Image
from open_clip.transform import image_transform
from openclip_robust.data.shards import encode_image
from skimage import data as skd
torch.set_num_threads(1)
imgs = [getattr(skd, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
pngs = []
for a in imgs:
    a = a if a.ndim == 3 else np.stack([a]*3, -1)
    b = io.BytesIO(); Image.fromarray(a[..., :3]).save(b, format="JPEG", quality=95); pngs.append(b.getvalue())
pre = image_transform(224, is_train=False)
small = [encode_image(p, 224)[1] for p in pngs]
def rate(blobs, rounds=20):
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(rounds):
            for bl in blobs: pre(Image.open(io.BytesIO(bl)).convert("RGB"))
        best = min(best, (time.perf_counter() - t) / (rounds * len(blobs)))
    return best
full, resized = rate(pngs), rate(small)
print(f"sizes {[Image.open(io.BytesIO(p)).size for p in pngs]}")
print(f"bytes/image full {np.mean([len(p) for p in pngs]):.0f} resized {np.mean([len(p) for p in small]):.0f}")
print(f"decode+eval transform per image: full {full*1e3:.2f} ms, pre-resized {resized*1e3:.2f} ms, ratio {full/resized:.2f}x")
