"""RSA geometry score (DiVE Sec. 5.3): how much fine-tuning preserved the embedding geometry.

For M samples, RDM_ij = 1 − cos(a_i, a_j) with pre-trained embeddings a, and the same with
fine-tuned embeddings b; the score is the Pearson correlation of the two RDMs' upper triangles
(diagonal excluded), in −1…1. Reported image-only, text-only and joint (images and captions as
one set of 2M points; the headline).

Memory: nothing M × M is materialised. Rows are taken in blocks of ``block_size``: a block's
cosine similarities to itself and to every later row (float32), are reduced to (count, means,
centred sums of squares and cross-products) in float64, and merged exactly (Chan et al.'s
pairwise update; also numerically stable for the 128M pairs of 16,000 points). Peak memory is
about 2 · block_size · N · (4 + 8) bytes for N points, plus normalised copies of the inputs.
Measured peak resident memory above the inputs, M = 8,000 image-caption pairs of d = 512 (the
joint score has N = 16,000 points), both models (``/proc`` VmHWM, command in the README toolkit section):
0.17 GiB at block_size 256, 0.26 GiB at 512 (default), 0.52 GiB at 1024 — against 1.9 GiB for a
single 16,000² float64 RDM, of which the direct computation needs one per model. Time: 35 s for
image + text + joint on 2 shared CPU cores.
"""
import logging
import math

import torch
import torch.nn.functional as F

from openclip_robust.evaluation.suite import (DatasetSpec, embed_images_texts, first_caption_rows, load_model,
                                              resolve_dataset)


def _pair_stats(x, y):
    """(n, mean_x, mean_y, Sxx, Syy, Sxy) of two equal-size float tensors, in float64; None if empty."""
    if x.numel() == 0:
        return None
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    mx, my = x.mean(), y.mean()
    x.sub_(mx)
    y.sub_(my)
    return x.numel(), mx, my, x.dot(x), y.dot(y), x.dot(y)  # dot: no squared temporaries


def _merge(s, t):
    """Combine (n, mean_x, mean_y, Sxx, Syy, Sxy) of two disjoint sets of pairs exactly (Chan et al.)."""
    if s is None or t is None:
        return t if s is None else s
    n1, mx1, my1, sxx1, syy1, sxy1 = s
    n2, mx2, my2, sxx2, syy2, sxy2 = t
    n = n1 + n2
    dx, dy, w = mx2 - mx1, my2 - my1, n1 * n2 / n
    return (n, mx1 + dx * n2 / n, my1 + dy * n2 / n,
            sxx1 + sxx2 + dx * dx * w, syy1 + syy2 + dy * dy * w, sxy1 + sxy2 + dx * dy * w)


def rdm_correlation(a, b, block_size=512):
    """Pearson correlation of the upper triangles of RDM(a) and RDM(b), a and b: [M, d] embeddings.

    Rows i of a and b are the same sample under the two models (d may differ). Embeddings are
    L2-normalised here. Pearson is invariant to x → 1 − x applied to both RDMs, so the cosine
    similarities are correlated directly. Row block [i0, i1) contributes its pairs with every
    later row (a dense rectangle) and the pairs inside the block (its strict upper triangle).
    Returns nan (with a warning) if an RDM is constant.
    """
    if len(a) != len(b):
        raise ValueError(f"RSA needs the same samples under both models: {len(a)} vs {len(b)} rows")
    if len(a) < 3:
        raise ValueError(f"RSA needs at least 3 points, got {len(a)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    m, stats = len(a), None
    for i0 in range(0, m, block_size):
        i1 = min(i0 + block_size, m)
        inside = torch.triu_indices(i1 - i0, i1 - i0, 1)
        stats = _merge(stats, _pair_stats((a[i0:i1] @ a[i0:i1].T)[inside[0], inside[1]],
                                          (b[i0:i1] @ b[i0:i1].T)[inside[0], inside[1]]))
        if i1 < m:
            stats = _merge(stats, _pair_stats(a[i0:i1] @ a[i1:].T, b[i0:i1] @ b[i1:].T))
    _, _, _, sxx, syy, sxy = stats
    if sxx <= 0 or syy <= 0:
        logging.warning("RSA: a dissimilarity matrix is constant; correlation undefined (nan)")
        return math.nan
    return float(sxy / torch.sqrt(sxx * syy))


def rsa_scores(image_pre, text_pre, image_ft, text_ft, block_size=512):
    """{"image", "text", "joint"} RSA of paired embeddings ([M, d] each; row i: image i and its caption)."""
    if not len(image_pre) == len(text_pre) == len(image_ft) == len(text_ft):
        raise ValueError("RSA needs M image-caption pairs under both models (all four inputs of M rows)")
    return {"image": rdm_correlation(image_pre, image_ft, block_size),
            "text": rdm_correlation(text_pre, text_ft, block_size),
            "joint": rdm_correlation(torch.cat([F.normalize(image_pre.float(), dim=-1),
                                                F.normalize(text_pre.float(), dim=-1)]),
                                     torch.cat([F.normalize(image_ft.float(), dim=-1),
                                                F.normalize(text_ft.float(), dim=-1)]), block_size)}


def embed_pairs(model, preprocess, tokenizer, data, max_samples=8000, batch_size=64, device="cpu", workers=0):
    """Normalised (image [M, d], caption [M, d]) embeddings of an image-caption set, first caption per image.

    data: shards, a CLIP_benchmark retrieval folder or a folder of x.jpg + x.txt (see evaluation).
    """
    spec = DatasetSpec(name=str(data), role="retrieval", path=str(data), max_samples=max_samples)
    images, texts, index = embed_images_texts(model, tokenizer, spec, resolve_dataset(spec), preprocess, device,
                                              batch_size, workers)
    return images, texts[first_caption_rows(index)]


def rsa_runs(pre, runs, data, max_samples=8000, batch_size=64, device="cpu", workers=0, block_size=512):
    """RSA of each fine-tuned Run against the pre-trained Run on one image-caption set.

    pre, runs: evaluation.Run (model name, checkpoint, pretrained). Returns {run name: {"image",
    "text", "joint"}}, with the pre-trained run itself at 1.0 by definition.
    """

    def embed(run):
        model, preprocess, tokenizer = load_model(run.model, run.checkpoint, run.pretrained, device)
        return embed_pairs(model, preprocess, tokenizer, data, max_samples, batch_size, device, workers)

    image_pre, text_pre = embed(pre)
    out = {pre.name: {"image": 1.0, "text": 1.0, "joint": 1.0}}
    for run in runs:
        image_ft, text_ft = embed(run)
        out[run.name] = rsa_scores(image_pre, text_pre, image_ft, text_ft, block_size)
        logging.info(f"RSA {run.name}: {out[run.name]}")
    return out
