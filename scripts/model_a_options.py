"""How much zero-shot a stronger model A buys, and what it costs: build model A's alignment at each image size
and number of alignment pairs (and, with --category-captions, with category-name captions added) and print its
zero-shot on the 25 held-out categories, its zero-shot on the clip-art target's test images, and the seconds
each stage took.

    .venv/bin/python scripts/model_a_options.py --sizes 64,96 --pairs 2500,0 --out runs/model-a-options

Uses the miniature's own data split and alignment (openclip_robust.miniature); renders are cached under OUT.
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from openclip_robust.miniature import data as md, experiment as ex
from openclip_robust.miniature.model import build_towers, lit_align, text_tower_without_dropout, tower_features


def zero_shot(heads, images, labels, prompts, n_classes):
    """Top-1 of prompt-ensembled zero-shot on tower features, through the folded heads."""
    img = F.normalize(images @ heads["image_w"].T + heads["image_b"], dim=-1)
    txt = F.normalize(prompts @ heads["text_w"].T, dim=-1).view(n_classes, len(md.CLIPART_TEMPLATES), -1).mean(1)
    return float(((img @ F.normalize(txt, dim=-1).T).argmax(1) == labels).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,96", help="image sizes (px), comma-separated")
    ap.add_argument("--pairs", default="2500",
                    help="alignment pairs (the default run's --ref_pairs cap; 0: every training pair), comma-separated")
    ap.add_argument("--category-captions", action="store_true",
                    help="also align with a class-prompt caption of each pair's category folder added")
    ap.add_argument("--out", default="runs/model-a-options")
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    cfg, out = ex.Config(ref_pairs=0), Path(a.out)
    held = md.held_out_categories(cfg.split_seed)
    splits, target = ex.split_all(cfg, md.openclipart_items())  # the miniature's own split (zero-shot as in the paper)
    caps = [int(n) for n in a.pairs.split(",")]
    if 0 not in caps:
        splits["align_train"] = splits["align_train"][:max(caps)]
    text_dir = text_tower_without_dropout(out / "minilm-no-dropout")
    rows = []
    for size in (int(s) for s in a.sizes.split(",")):
        render = size * 5 // 4  # the default's 80 px store for 64 px
        clipart = (out / f"clipart-{render}px").resolve()
        need = sorted({r for s in [*splits.values(), *target.values()] for r, _, _ in s})
        t = time.time()
        bad = ex.render_needed(clipart, need, render)
        t_render = time.time() - t
        keep = {k: [it for it in v if it[0] not in bad] for k, v in [*splits.items(), ("test", target["test"])]}
        model, preprocess, tokenizer = build_towers(out / f"towers-{size}", size, text_dir)

        def feats(rows_, caption=lambda it: it[2]):
            return tower_features(model, preprocess, tokenizer, [(str(clipart / it[0]), caption(it)) for it in rows_])
        t = time.time()
        train, val = feats(keep["align_train"]), feats(keep["align_val"])
        t_features = time.time() - t
        sets = {}
        for name, rows_, classes in (("zeroshot", keep["zeroshot"], held), ("target", keep["test"], md.TARGET_CLASSES)):
            images, _ = feats(rows_, lambda it: "")
            labels = torch.tensor([list(classes).index(it[1]) for it in rows_])
            prompts = [t_.format(c=classes[c]) for c in classes for t_ in md.CLIPART_TEMPLATES]
            _, prompt_feats = tower_features(model, preprocess, tokenizer, [(str(clipart / rows_[0][0]), p)
                                                                            for p in prompts])
            sets[name] = (images, labels, prompt_feats, len(classes))
        variants = {f"{n or len(train[0])} caption pairs": (train[0][:n or None], train[1][:n or None]) for n in caps}
        if a.category_captions:  # the category folder's last part as a class-prompt caption, one per pair
            rng = random.Random(0)
            name = lambda it: (it[1].rsplit("/", 1)[-1] or "things").replace("_", " ")  # noqa: E731
            _, cat_txt = feats(keep["align_train"], lambda it: rng.choice(md.CLIPART_TEMPLATES).format(c=name(it)))
            n = caps[0] or None
            variants[f"{len(train[0][:n])} caption pairs + category prompts"] = (
                torch.cat([train[0][:n], train[0][:n]]), torch.cat([train[1][:n], cat_txt[:n]]))
        for variant, data in variants.items():
            t = time.time()
            res = lit_align(data, val, steps=cfg.align_steps, seed=cfg.seed)
            row = {"image_size": size, "alignment": variant,
                   "val_R@5": round(res["best_val_R@5"], 3), "best_step": res["best_step"],
                   **{f"{k}_top1": round(100 * zero_shot(res["heads"], *v), 1) for k, v in sets.items()},
                   "seconds": {"render": round(t_render), "features": round(t_features),
                               "align": round(time.time() - t)}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "model_a_options.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
