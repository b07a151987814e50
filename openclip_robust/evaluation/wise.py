"""WiSE-FT weight ensembling: θ = (1 − a)·θ_pre + a·θ_ft over every floating tensor (both towers).

Works on state dicts, never pickled modules. Integer/bool buffers are copied from the fine-tuned
model. For several a, the best on the suite's ``id`` role is kept: give a suite whose ``id``
entry is the ID *validation* split, so the test split stays unseen. The output checkpoint is
``{"state_dict": ..., "wise": {"alpha": a, "id_scores": {...}}}``, loadable by plain
``open_clip.create_model_and_transforms(model, pretrained=path)`` (or ``load_checkpoint`` for a
``local-dir:`` architecture).
"""
import logging
import os

import torch
from tqdm import tqdm

from openclip_robust.evaluation.suite import evaluate_model, load_model


def read_state_dict(path):
    """State dict of a checkpoint file: ``{"state_dict": ...}`` or a bare one; ``module.`` stripped."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    return {k.removeprefix("module."): v for k, v in sd.items()}


def interpolate_state_dicts(pre, ft, alpha):
    """(1 − alpha)·pre + alpha·ft for floating tensors (computed in float32 at least, cast to ft's
    dtype); other tensors copied from ft. Different keys or shapes raise, naming the first one."""
    pre = {k.removeprefix("module."): v for k, v in pre.items()}
    ft = {k.removeprefix("module."): v for k, v in ft.items()}
    for key in list(pre) + [k for k in ft if k not in pre]:
        if key not in pre or key not in ft:
            side = "fine-tuned" if key not in ft else "pre-trained"
            raise ValueError(f"state dicts differ (different architectures?): key {key!r} missing from the "
                             f"{side} model")
        if pre[key].shape != ft[key].shape:
            raise ValueError(f"state dicts differ (different architectures?): {key!r} has shape "
                             f"{tuple(pre[key].shape)} pre-trained vs {tuple(ft[key].shape)} fine-tuned")
    out = {}
    for key, f in ft.items():
        if not f.is_floating_point():
            out[key] = f.clone()
            continue
        dtype = torch.promote_types(f.dtype, torch.float32)
        out[key] = ((1 - alpha) * pre[key].to(dtype) + alpha * f.to(dtype)).to(f.dtype)
    return out


def wise_ft(model_name, finetuned, alphas, out=None, suite=None, pretrained=None, pre_checkpoint=None,
            device="cpu", batch_size=64, workers=0):
    """Interpolate a fine-tuned checkpoint with the pre-trained weights; pick a on the ID role.

    model_name/pretrained/pre_checkpoint: the pre-trained model as in ``evaluation.load_model``.
    finetuned: checkpoint path. alphas: one value (no suite needed) or several (suite required: the
    mean headline score of its ``id`` datasets picks a; ties keep the earlier a). Writes `out` if
    given. Returns {"alpha", "id_scores": {a: score}, "path", "state_dict"}.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be in [0, 1], got {alphas}")
    if len(alphas) > 1 and suite is None:
        raise ValueError("several alphas need a suite with an 'id' dataset to choose among them")
    model, preprocess, tokenizer = load_model(model_name, pre_checkpoint, pretrained, device)
    pre = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ft = read_state_dict(finetuned)
    scores, best = {}, None
    for a in tqdm(alphas, desc="WiSE-FT alphas"):
        sd = interpolate_state_dicts(pre, ft, a)
        if len(alphas) > 1:
            model.load_state_dict(sd)
            scores[a] = evaluate_model(model, preprocess, tokenizer, suite, device, batch_size, workers,
                                       roles=("id",))["roles"]["id"]
            logging.info(f"WiSE-FT a={a}: ID {scores[a]:.4f}")
        if best is None or scores.get(a, 0) > scores.get(best[0], 0):
            best = (a, sd)
    alpha, sd = best
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save({"state_dict": sd, "wise": {"alpha": alpha, "id_scores": {str(k): v for k, v in scores.items()}}},
                   out)
    return {"alpha": alpha, "id_scores": scores, "path": out, "state_dict": sd}
