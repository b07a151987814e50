"""FLYP's per-read template draw, wired into upstream's train loader by the plugin's add_data hook."""
import argparse

import open_clip
import torch
from open_clip_train.data import get_data

from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import digits_samples
from openclip_robust.data.prompt_redraw import redraw_prompts

TEMPLATES = ["a photo of the digit {c}.", "a sketch of {c}.", "{c}, handwritten.", "the number {c}."]


def loader_args(shards, n):
    return argparse.Namespace(
        train_data=shards, val_data=None, dataset_type="webdataset", train_num_samples=n, train_data_upsampling_factors=None,
        batch_size=8, workers=0, world_size=1, rank=0, seed=0, dataset_resampled=False, imagenet_val=None,
        imagenet_v2=None, distributed=False)


def threes(tmp_path, with_metadata):
    """Shards whose every image is a 'three' stored with template 0; optionally the metadata files beside them."""
    samples = [dict(s, txt=TEMPLATES[0].format(c="three"), cls="3") for s in digits_samples(24)]
    shards = write_samples(str(tmp_path), samples, 12)["shards"]
    if with_metadata:
        (tmp_path / "classnames.txt").write_text("\n".join(["zero", "one", "two", "three"]) + "\n")
        (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return shards


def token_rows(args, tokenizer, redraw):
    preprocess = open_clip.image_transform(32, is_train=True)
    data = get_data(args, (preprocess, preprocess), epoch=0, tokenizer=tokenizer)
    if redraw:
        redraw_prompts(args, data, (preprocess, preprocess), 0, tokenizer)
    rows = []
    for _ in range(2):  # two epochs
        for _, texts in data["train"].dataloader:
            rows += [tuple(r.tolist()) for r in texts]
    return rows


def test_each_read_draws_a_template_of_the_same_class(tmp_path):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rows = token_rows(loader_args(threes(tmp_path, True), 24), tokenizer, redraw=True)
    allowed = {tuple(tokenizer(t.format(c="three"))[0].tolist()) for t in TEMPLATES}
    assert len(rows) == 48
    assert set(rows) <= allowed  # the class never changes
    assert len(set(rows)) == len(TEMPLATES)  # 48 draws over 4 templates: every one appears


def test_without_metadata_captions_stay_as_stored(tmp_path):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rows = token_rows(loader_args(threes(tmp_path, False), 24), tokenizer, redraw=True)
    stored = tuple(tokenizer(TEMPLATES[0].format(c="three"))[0].tolist())
    assert rows and set(rows) == {stored}
    assert torch.tensor(rows).shape[1] == 77
