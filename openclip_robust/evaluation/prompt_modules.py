"""Base / New / H of a prompt module (seed 004, Table 2): the module inserted into the original model A
(Base) and into an upgraded model B with the same token space (New), next to both models' zero-shot.

    python -m openclip_robust evaluate-prompt --prompt-module m.pt --model A --pretrained a \\
        --upgraded-model B --upgraded-pretrained b --suite suite.json --out results/

Every classification dataset of the suite (roles id, ood, zeroshot; retrieval entries are skipped) is
scored by top-1 accuracy (%) with four heads: zero-shot A and B (the suite's templates, prompt-ensembled)
and the module's class weights rebuilt in A and in B from each model's own class-name embeddings.
H = 2·Base·New / (Base + New). Writes prompt_results.json and prints the table.
"""
import json
import logging
import os

import torch

from openclip_robust.evaluation.suite import batches, load_model, load_suite, resolve_dataset, zeroshot_head
from openclip_robust.prompts import ClassPrompts, PromptModule, TextTower, class_weights


def harmonic(base, new):
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@torch.no_grad()
def accuracies(model, preprocess, tokenizer, modules, spec, device="cpu", batch_size=64, workers=0, chunk=256):
    """(zero-shot top-1, [top-1 of each prompt module]) in % on one classification dataset (one image pass)."""
    source = resolve_dataset(spec)
    names = source["classnames"]
    zs = zeroshot_head(model, tokenizer, names, source["templates"], device)           # [d, C]
    tower = TextTower(model)
    heads = [zs.float()] + [class_weights(m, tower, ClassPrompts(tower, tokenizer, names, m.n_ctx, device), chunk).T
                            for m in modules]
    hits = torch.zeros(len(heads))
    seen = 0
    for images, targets, _ in batches(spec, source, preprocess, batch_size, workers):
        if images is None:
            continue
        f = model.encode_image(images.to(device), normalize=True).float()
        y = torch.as_tensor(targets, device=device)
        for i, head in enumerate(heads):
            hits[i] += ((f @ head).argmax(1) == y).sum().item()
        seen += len(y)
    if seen == 0:
        raise ValueError(f"dataset '{spec.name}': no readable images")
    acc = (100 * hits / seen).tolist()
    return acc[0], acc[1:]


def evaluate_prompt_modules(module_paths, model, pretrained, upgraded_model, upgraded_pretrained, suite,
                            device="cpu", batch_size=64, workers=0, checkpoint=None, upgraded_checkpoint=None):
    """[result dict per module file]: A and B are loaded once and each dataset's images encoded once for all."""
    paths = list(module_paths)
    modules = [PromptModule.load(p).to(device).eval() for p in paths]
    specs = [s for s in load_suite(suite) if s.role != "retrieval"]
    if not specs:
        raise ValueError(f"suite {suite}: no classification dataset (roles id, ood, zeroshot)")
    scores = [{s.name: {} for s in specs} for _ in modules]
    models = {}
    for label, name, weights, ckpt in (("A", model, pretrained, checkpoint),
                                       ("B", upgraded_model, upgraded_pretrained, upgraded_checkpoint)):
        models[label] = load_model(name, ckpt, weights, device)
        for module in modules:  # every module refused before any data is read
            module.check(models[label][0], models[label][2], f"model {label} ({name})")
    for label, (m, preprocess, tokenizer) in models.items():
        for spec in specs:
            zs, prompted = accuracies(m, preprocess, tokenizer, modules, spec, device, batch_size, workers)
            for score, acc in zip(scores, prompted):
                score[spec.name][f"zs_{label}"] = zs
                score[spec.name]["base" if label == "A" else "new"] = acc
            logging.info(f"{spec.name} model {label}: zero-shot {zs:.2f}, with the module(s) "
                         + ", ".join(f"{a:.2f}" for a in prompted))
    results = []
    for path, module, score in zip(paths, modules, scores):
        rows = dict(score)
        rows["average"] = {k: sum(r[k] for r in score.values()) / len(score) for k in ("zs_A", "zs_B", "base", "new")}
        for r in rows.values():
            r["zs_H"], r["H"] = harmonic(r["zs_A"], r["zs_B"]), harmonic(r["base"], r["new"])
        results.append({"prompt_module": str(path), "model_A": model, "model_B": upgraded_model,
                        "token_space": module.token_space, "datasets": rows})
    return results


def evaluate_prompt_module(module_path, model, pretrained, upgraded_model, upgraded_pretrained, suite, out_dir=None,
                           device="cpu", batch_size=64, workers=0, checkpoint=None, upgraded_checkpoint=None):
    """The result dict of one module file; writes prompt_results.json into out_dir if given."""
    result, = evaluate_prompt_modules([module_path], model, pretrained, upgraded_model, upgraded_pretrained, suite,
                                      device, batch_size, workers, checkpoint, upgraded_checkpoint)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "prompt_results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(result, method="module"):
    """Seed 004's Table 2 layout: per dataset, rows Base / New / H; columns zero-shot and the module."""
    lines = [f"| dataset | | ZS | {method} |", "|---|---|---|---|"]
    for name, r in result["datasets"].items():
        for i, (row, zs, mod) in enumerate((("Base", "zs_A", "base"), ("New", "zs_B", "new"), ("H", "zs_H", "H"))):
            lines.append(f"| {name if i == 0 else ''} | {row} | {r[zs]:.2f} | {r[mod]:.2f} |")
    return "\n".join(lines)
