"""Retention metrics: how far the current model has moved from the pre-trained one (features in, numbers out).

On M held-out image-caption pairs, each side (current, pre-trained) is a pair of L2-normalised embeddings
(image [M, d], caption [M, d]; row i of both sides is the same sample):
  * RSA image / text / joint (rsa.rsa_scores: 1 = the geometry is kept);
  * mean ‖u‖, ‖v‖ with u = f_cur(x) − f_pre(x), v = g_cur(t) − g_pre(t): DiVE's difference vectors;
  * image→text and text→image R@1, R@5 of each side (one caption per image).
On a zero-shot suite: top-1 of each side per dataset and retained = current / pre-trained.
The run-time side (which samples, which ranks, when) is openclip_robust.retention.
"""
import math

import torch

from openclip_robust.evaluation.rsa import rsa_scores
from openclip_robust.evaluation.suite import retrieval_metrics

RECALLS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")


def difference_norms(current, pretrained):
    """{"u_norm", "v_norm"}: mean ‖f_cur − f_pre‖ over the images, mean ‖g_cur − g_pre‖ over the captions."""
    (img, txt), (img_pre, txt_pre) = current, pretrained
    return {"u_norm": (img.float() - img_pre.float()).norm(dim=-1).mean().item(),
            "v_norm": (txt.float() - txt_pre.float()).norm(dim=-1).mean().item()}


def recalls(image, text):
    """R@1, R@5 both ways of paired embeddings (caption i belongs to image i)."""
    out = retrieval_metrics(image.float(), text.float(), list(range(len(image))))
    return {k: out[k] for k in RECALLS}


def pair_metrics(current, pretrained, pretrained_recalls=None):
    """RSA, difference norms and recalls of the current side next to the pre-trained side's.

    current, pretrained: (image [M, d], caption [M, d]). pretrained_recalls: the pre-trained side's recalls when
    already known (they are computed once per run)."""
    (img, txt), (img_pre, txt_pre) = current, pretrained
    rsa = rsa_scores(img_pre, txt_pre, img, txt)
    out = {f"rsa_{k}": v for k, v in rsa.items()}
    out.update(difference_norms(current, pretrained))
    out.update(recalls(img, txt))
    pre = pretrained_recalls if pretrained_recalls is not None else recalls(img_pre, txt_pre)
    out.update({f"pre_{k}": v for k, v in pre.items()})
    return out


def zeroshot_metrics(top1, pretrained_top1):
    """Per dataset {name}_top1, {name}_pre_top1, {name}_retained (current / pre-trained; nan when the pre-trained
    top-1 is 0), and their means over the datasets: zeroshot_top1, zeroshot_pre_top1, zeroshot_retained."""
    out = {}
    for name, value in top1.items():
        pre = pretrained_top1[name]
        out[f"zs_{name}_top1"], out[f"zs_{name}_pre_top1"] = value, pre
        out[f"zs_{name}_retained"] = value / pre if pre > 0 else math.nan
    if top1:
        out["zeroshot_top1"] = sum(top1.values()) / len(top1)
        out["zeroshot_pre_top1"] = sum(pretrained_top1[n] for n in top1) / len(top1)
        out["zeroshot_retained"] = sum(out[f"zs_{n}_retained"] for n in top1) / len(top1)
    return out


def classifier_top1(correct, total):
    """Top-1 from counts summed over ranks; nan for an empty dataset."""
    return correct / total if total else math.nan


def class_head(text_features, n_classes, n_templates):
    """[d, C] zero-shot head from normalised caption embeddings laid out class-major (C x T rows): the mean
    over templates, renormalised (CLIP's prompt ensembling, as CLIP_benchmark's zero_shot_classifier)."""
    emb = text_features.float().reshape(n_classes, n_templates, -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).T
