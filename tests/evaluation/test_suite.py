"""Evaluation on datasets with known answers: accuracy, macro-F1, role averages, layouts, reports, bad input."""
import io
import json
import logging
import math
import struct

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from open_clip.model import CLIP
from PIL import Image

from openclip_robust.demo.samples import TINY_CFG
from openclip_robust.evaluation import suite as ev
from openclip_robust.evaluation import report
from openclip_robust.data import shards

NAMES = ["bird", "cat", "dog"]  # ImageFolder order of the class folders
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}!"]
ID_LEVELS = {"bird": 30, "cat": 90, "dog": 150}
OOD_LEVELS = {"bird": 50, "cat": 110, "dog": 170}
ZS_NAMES, ZS_TEMPLATES, ZS_LEVELS = ["red", "green"], ["the colour {c}"], {"red": 210, "green": 240}


def grey(level, size=16):
    return Image.fromarray(np.full((size, size, 3), level, np.uint8))


def image_folder(root, levels, per_class=4):
    for name, level in levels.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            grey(level).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")


@torch.no_grad()
def class_embedding(clip, tokenizer, name, templates):
    """By hand: mean of the normalised text embeddings of the prompts, renormalised."""
    e = F.normalize(clip.encode_text(tokenizer([t.format(c=name) for t in templates])), dim=-1).mean(0)
    return e / e.norm()


class KnownAnswerModel(torch.nn.Module):
    """The tiny CLIP's text tower; an image tower that returns the embedding assigned to the image's grey level."""

    def __init__(self, clip, preprocess, answers):
        super().__init__()
        self.clip = clip
        levels = list(answers)
        self.means = torch.tensor([float(preprocess(grey(g)).mean()) for g in levels])
        self.embeddings = torch.stack([answers[g] for g in levels])

    def encode_text(self, tokens, normalize=False):
        return self.clip.encode_text(tokens, normalize=normalize)

    def encode_image(self, images, normalize=False):
        nearest = (images.mean(dim=(1, 2, 3))[:, None] - self.means[None]).abs().argmin(1)
        return self.embeddings[nearest]


@pytest.fixture(scope="module")
def known(tiny):
    """ID: every image right. OOD: the dogs are answered 'bird', the rest right. ZS: every image right."""
    clip, preprocess, tokenizer = tiny
    head = {n: class_embedding(clip, tokenizer, n, TEMPLATES) for n in NAMES}
    zs = {n: class_embedding(clip, tokenizer, n, ZS_TEMPLATES) for n in ZS_NAMES}
    answers = {ID_LEVELS[n]: head[n] for n in NAMES}
    answers.update({OOD_LEVELS[n]: head["bird" if n == "dog" else n] for n in NAMES})
    answers.update({ZS_LEVELS[n]: zs[n] for n in ZS_NAMES})
    return KnownAnswerModel(clip, preprocess, answers).eval(), preprocess, tokenizer


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def suite(tmp_path):
    image_folder(tmp_path / "id", ID_LEVELS)
    image_folder(tmp_path / "ood", OOD_LEVELS)
    image_folder(tmp_path / "zs_images", {"a": ZS_LEVELS["red"], "b": ZS_LEVELS["green"]}, per_class=3)
    write_lines(tmp_path / "templates.txt", TEMPLATES)
    write_lines(tmp_path / "zs_names.txt", ZS_NAMES)
    write_lines(tmp_path / "zs_templates.txt", [t.replace("{c}", "{}") for t in ZS_TEMPLATES])  # {} is accepted
    suite = {"templates": "templates.txt", "datasets": [
        {"name": "id-set", "role": "id", "path": "id", "metrics": ["top1", "top5"]},
        {"name": "ood-set", "role": "ood", "path": "ood", "metrics": ["top1", "macro_f1", "balanced_acc"]},
        {"name": "zs-set", "role": "zeroshot", "path": "zs_images", "classnames": "zs_names.txt",
         "templates": "zs_templates.txt"}]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    return tmp_path / "suite.json"


def test_known_answers_per_dataset_and_per_role(known, suite):
    model, preprocess, tokenizer = known
    res = ev.evaluate_model(model, preprocess, tokenizer, str(suite))
    d = res["datasets"]
    assert d["id-set"]["top1"] == 1.0 and d["id-set"]["top5"] == 1.0 and d["id-set"]["n"] == 12
    assert d["ood-set"]["top1"] == pytest.approx(8 / 12)
    assert d["ood-set"]["balanced_acc"] == pytest.approx((1 + 1 + 0) / 3)
    # per-class F1: bird P=4/8 R=1 -> 2/3; cat 1; dog 0
    assert d["ood-set"]["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert d["zs-set"]["top1"] == 1.0 and d["zs-set"]["n"] == 6
    assert d["ood-set"]["score"] == d["ood-set"]["top1"]  # the first metric is the headline
    assert res["roles"] == pytest.approx({"id": 1.0, "ood": 8 / 12, "zeroshot": 1.0})


def test_head_is_prompt_ensembled_from_the_models_own_text_tower(tiny):
    clip, _, tokenizer = tiny
    head = ev.zeroshot_head(clip, tokenizer, NAMES, TEMPLATES)
    by_hand = torch.stack([class_embedding(clip, tokenizer, n, TEMPLATES) for n in NAMES], dim=1)
    assert head.shape == (32, 3) and torch.allclose(head, by_hand, atol=1e-6)
    moved = CLIP(**TINY_CFG).eval()  # another checkpoint: a different text tower gives a different head
    g = torch.Generator().manual_seed(0)
    moved.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) if k == "text_projection" else v
                           for k, v in clip.state_dict().items()})
    assert not torch.allclose(ev.zeroshot_head(moved, tokenizer, NAMES, TEMPLATES), head, atol=1e-3)


def cb_layout(root, levels, names, templates, split="test"):
    """CLIP_benchmark's webdataset layout: root/<split>/0.tar (cls + webp), classnames and templates beside."""
    (root / split).mkdir(parents=True)
    with wds.TarWriter(str(root / split / "0.tar")) as sink:
        for c, name in enumerate(names):
            for k in range(4):
                buf = io.BytesIO()
                grey(levels[name]).save(buf, format="WEBP", lossless=True)
                sink.write({"__key__": f"s{c}_{k}", "webp": buf.getvalue(), "cls": str(c)})
    write_lines(root / "classnames.txt", names)
    write_lines(root / "zeroshot_classification_templates.txt", templates)
    return root


def test_webdataset_layouts_give_the_same_answers(known, tmp_path):
    model, preprocess, tokenizer = known
    cb_layout(tmp_path / "cb_ood", OOD_LEVELS, NAMES, TEMPLATES)
    target = shards.make_target_shards(str(image_folder(tmp_path / "ood_folder", OOD_LEVELS)), str(tmp_path / "tgt"),
                                       templates=TEMPLATES, samples_per_shard=5, workers=1)
    suite = {"datasets": [
        {"name": "cb", "role": "ood", "path": str(tmp_path / "cb_ood"), "metrics": ["top1", "macro_f1"]},
        {"name": "target-shards", "role": "ood", "path": target["shards"], "metrics": ["top1", "macro_f1"]},
        {"name": "target-dir", "role": "ood", "path": str(tmp_path / "tgt"), "max_samples": 7}]}
    res = ev.evaluate_model(model, preprocess, tokenizer, suite)["datasets"]
    for name in ("cb", "target-shards"):
        assert res[name]["n"] == 12 and res[name]["top1"] == pytest.approx(8 / 12), name
        assert res[name]["macro_f1"] == pytest.approx(5 / 9), name
    assert res["target-dir"]["n"] == 7


def test_corrupt_image_is_skipped_with_a_counted_warning(known, tmp_path, caplog):
    model, preprocess, tokenizer = known
    image_folder(tmp_path / "id", ID_LEVELS)
    (tmp_path / "id" / "cat" / "broken.png").write_bytes(b"not an image")
    spec = {"datasets": [{"name": "id-set", "role": "id", "path": str(tmp_path / "id"), "templates": TEMPLATES}]}
    spec["datasets"][0]["templates"] = write_lines(tmp_path / "t.txt", TEMPLATES)
    with caplog.at_level(logging.WARNING):
        res = ev.evaluate_model(model, preprocess, tokenizer, spec)["datasets"]["id-set"]
    assert (res["n"], res["skipped"], res["top1"]) == (12, 1, 1.0)
    assert "dataset 'id-set': skipped 1 unreadable image(s) of 13" in caplog.text and "broken.png" in caplog.text


def test_bad_suites_are_named(tiny, tmp_path):
    clip, preprocess, tokenizer = tiny
    run = lambda datasets: ev.evaluate_model(clip, preprocess, tokenizer, {"datasets": datasets})  # noqa: E731
    with pytest.raises(FileNotFoundError, match="dataset 'gone': .*nowhere not found"):
        run([{"name": "gone", "role": "id", "path": str(tmp_path / "nowhere")}])
    image_folder(tmp_path / "id", ID_LEVELS, per_class=1)
    two = write_lines(tmp_path / "two.txt", ["a", "b"])
    with pytest.raises(ValueError, match="dataset 'x': .*two.txt lists 2 class names but .* 3 class folders"):
        run([{"name": "x", "role": "id", "path": str(tmp_path / "id"), "classnames": two}])
    cb_layout(tmp_path / "cb", ID_LEVELS, NAMES, TEMPLATES)
    with pytest.raises(ValueError, match="dataset 'cb': label 2 in the data but .*two.txt lists 2 class names"):
        run([{"name": "cb", "role": "id", "path": str(tmp_path / "cb"), "classnames": two}])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="dataset 'e': .*neither \\*.tar shards nor class folders"):
        run([{"name": "e", "role": "id", "path": str(tmp_path / "empty")}])
    with pytest.raises(ValueError, match="role 'train' not in"):
        ev.load_suite({"datasets": [{"name": "x", "role": "train", "path": "id"}]})
    with pytest.raises(ValueError, match="metrics \\['f1'\\] not in"):
        ev.load_suite({"datasets": [{"name": "x", "role": "id", "path": "id", "metrics": ["f1"]}]})
    with pytest.raises(ValueError, match="'x' appears twice"):
        ev.load_suite({"datasets": [{"name": "x", "role": "id", "path": "a"}, {"name": "x", "role": "ood", "path": "b"}]})
    with pytest.raises(ValueError, match="no 'datasets' list"):
        ev.load_suite({"sets": []})


def test_retrieval_metrics_by_hand():
    img = torch.eye(3)
    # captions 0..3 of images 0, 1, 2, 2; caption 0 is nearer image 1 (0.8) than its own (0.6),
    # caption 1 nearer image 2 (0.8) than its own (0.6)
    txt = F.normalize(torch.tensor([[0.6, 0.8, 0], [0, 0.6, 0.8], [0, 0, 1.0], [0.1, 0, 1.0]]), dim=-1)
    out = ev.retrieval_metrics(img, txt, [0, 1, 2, 2])
    assert out["t2i_R@1"] == pytest.approx(2 / 4)  # captions 2 and 3 find image 2
    assert out["i2t_R@1"] == pytest.approx(2 / 3)  # image 1's best caption is caption 0 (image 0's)
    assert out["t2i_R@5"] == out["i2t_R@5"] == 1.0
    assert out["mean_R@1"] == pytest.approx((2 / 4 + 2 / 3) / 2)


def test_retrieval_on_a_caption_folder_with_known_answers(tiny, tmp_path):
    clip, preprocess, tokenizer = tiny
    captions = {20: "a small boat", 100: "a red house", 180: "two dogs\nsome dogs", 250: "the sea"}
    (tmp_path / "pairs").mkdir()
    for level, caption in captions.items():
        grey(level).save(tmp_path / "pairs" / f"{level}.png")
        (tmp_path / "pairs" / f"{level}.txt").write_text(caption)
    with torch.no_grad():  # each image's embedding is its first caption's text embedding
        answers = {g: F.normalize(clip.encode_text(tokenizer([c.splitlines()[0]])), dim=-1)[0]
                   for g, c in captions.items()}
    model = KnownAnswerModel(clip, preprocess, answers)
    spec = {"datasets": [{"name": "pairs", "role": "retrieval", "path": str(tmp_path / "pairs"),
                          "metrics": ["t2i_R@1", "i2t_R@1"]}]}
    res = ev.evaluate_model(model, preprocess, tokenizer, spec)["datasets"]["pairs"]
    assert (res["n"], res["n_captions"], res["i2t_R@1"]) == (4, 5, 1.0)
    assert res["t2i_R@1"] >= 4 / 5 and res["score"] == res["t2i_R@1"]


def fake_results():
    def run(name, method, id_, ood, zs):
        return {"name": name, "method": method, "roles": {"id": id_, "ood": ood, "zeroshot": zs},
                "datasets": {"digits": {"role": "id", "metric": "top1", "score": id_}}}
    return {"runs": [run("pre", "pre-trained", 0.5, 0.4, 0.6), run("flyp/s0", "flyp", 0.8, 0.5, 0.3),
                     run("flyp/s1", "flyp", 0.6, 0.5, 0.1)]}


def test_markdown_table_in_the_papers_layout_and_plot(tmp_path):
    results = report.attach_rsa(fake_results(), {"pre": 1.0, "flyp": {"image": 0.7, "text": 0.9, "joint": 0.8}})
    paths = report.write_report(results, str(tmp_path / "out"))
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == "| method | runs | ID | OOD avg | ZS avg | RSA |"
    assert table[2] == "| pre-trained | 1 | 50.0 | 40.0 | 60.0 | 1.000 |"
    # two seeds: mean ± sample std, (0.8, 0.6) -> 70.0 ± 14.1, (0.3, 0.1) -> 20.0 ± 14.1
    assert table[3] == f"| flyp | 2 | 70.0 ± {100 * math.sqrt(0.02):.1f} | 50.0 ± 0.0 | 20.0 ± 14.1 | 0.800 ± 0.000 |"
    assert "| flyp | 70.0 ± 14.1 |" in table
    png = (tmp_path / "out" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (480, 420)  # IHDR width, height: 4 x 3.5 inches at 120 dpi
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][1]["rsa"]["joint"] == 0.8
    assert set(paths) == {"json", "md", "png"}


def test_evaluate_runs_checkpoints_and_fails_early_on_a_bad_suite(tmp_path, tiny_model_dir):
    image_folder(tmp_path / "id", ID_LEVELS, per_class=2)
    sd = torch.load(f"{tiny_model_dir}/open_clip_pytorch_model.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, tmp_path / "same.pt")
    torch.save({"state_dict": {k: torch.zeros_like(v) if k == "text_projection" else v for k, v in sd.items()}},
               tmp_path / "zeroed.pt")
    model = f"local-dir:{tiny_model_dir}"
    suite = {"datasets": [{"name": "id-set", "role": "id", "path": str(tmp_path / "id"), "metrics": ["top1"]}]}
    runs = [ev.Run("base", model), ev.Run("same/s0", model, str(tmp_path / "same.pt")),
            ev.Run("zeroed", model, str(tmp_path / "zeroed.pt"))]
    res = ev.evaluate(runs, suite, out_dir=str(tmp_path / "out"))
    scores = {r["name"]: r["datasets"]["id-set"]["score"] for r in res["runs"]}
    assert scores["base"] == scores["same/s0"]  # the checkpoint of the same weights, 'module.'-prefixed
    assert scores["zeroed"] == pytest.approx(1 / 3)  # all-zero text tower output: every image gets class 0
    assert res["runs"][1]["method"] == "same"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "results.png"}
    bad = {"datasets": suite["datasets"] + [{"name": "gone", "role": "ood", "path": str(tmp_path / "gone")}]}
    with pytest.raises(FileNotFoundError, match="dataset 'gone'"):
        ev.evaluate([ev.Run("x", model, str(tmp_path / "no_such_checkpoint.pt"))], bad)  # before any model
    with pytest.raises(FileNotFoundError, match="checkpoint .*no_such_checkpoint.pt not found"):
        ev.evaluate([ev.Run("x", model, str(tmp_path / "no_such_checkpoint.pt"))], suite)
