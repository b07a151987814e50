"""Shard writers (target and reference), shard checks, and the per-read prompt redraw."""
import io
import json
import logging
import pickle
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from openclip_robust.data import shards
from openclip_robust.data.prompt_redraw import PromptRedrawTokenizer

CLASSES = ["cat", "dog", "bird"]  # folder order (sorted): bird, cat, dog
LEVELS = {"cat": 40, "dog": 120, "bird": 200}  # each class's images have one grey level
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}!", "itap of a {}."]


def grey_png(path, level, size=12):
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(path)


def image_folder(root, per_class=4, corrupt=0):
    for name, level in LEVELS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            grey_png(root / name / f"{k}.png", level)
    for k in range(corrupt):
        (root / "cat" / f"broken{k}.png").write_bytes(b"\x89PNG but not really")
    return root


def read_samples(pattern):
    out = []
    for url in shards.shard_list(pattern):
        out += list(wds.WebDataset(url, shardshuffle=False).decode("rgb8"))
    return out


def as_text(texts):
    """A stand-in tokenizer that returns the text, so the drawn caption is visible."""
    return texts


# -- target shards -------------------------------------------------------------------------------------
def test_target_shards_round_trip(tmp_path):
    image_folder(tmp_path / "src", per_class=5)
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "out"), templates=str(tmp_path / "t.txt"),
                                    samples_per_shard=4, workers=1)
    assert (out["num_samples"], out["num_shards"], out["skipped"]) == (15, 4, [])
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        "000000.tar": 4, "000001.tar": 4, "000002.tar": 4, "000003.tar": 3}
    names = (tmp_path / "out" / "classnames.txt").read_text().split("\n")[:-1]
    assert names == ["bird", "cat", "dog"]
    written_templates = (tmp_path / "out" / "templates.txt").read_text().splitlines()
    assert written_templates == [t.replace("{}", "{c}") for t in TEMPLATES]
    samples = read_samples(out["shards"])
    assert len(samples) == 15 and len({s["__key__"] for s in samples}) == 15
    allowed = {t.format(c=c) for t in written_templates for c in names}
    per_class = {c: 0 for c in names}
    for s in samples:
        name = names[int(s["cls"])]
        assert s["txt"] in allowed and s["txt"] in {t.format(c=name) for t in written_templates}
        assert abs(s["png"].mean() - LEVELS[name]) < 1  # the image is one of that class's images
        per_class[name] += 1
    assert per_class == {"bird": 5, "cat": 5, "dog": 5}
    assert [int(s["cls"]) for s in samples] != sorted(int(s["cls"]) for s in samples)  # shuffled, not class-sorted


def test_default_templates_are_open_clips_80():
    templates = shards.load_templates(None)
    assert len(templates) == 80 and all("{c}" in t for t in templates)
    assert "a photo of a {c}." in templates


def test_target_shards_from_tsv_and_csv_tables(tmp_path):
    image_folder(tmp_path / "img", per_class=2)
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    rows = [f"img/{c}/{k}.png\t{label}" for c, label in (("cat", "cat"), ("dog", "1"), ("bird", "bird"))
            for k in range(2)]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    csv_rows = ["path,label"] + [r.replace("\t", ",") for r in rows]
    (tmp_path / "pairs.csv").write_text("\n".join(csv_rows) + "\n")
    for table in ("pairs.tsv", "pairs.csv"):
        out = shards.make_target_shards(str(tmp_path / table), str(tmp_path / f"out_{table}"),
                                        classnames=str(tmp_path / "names.txt"), templates=["{c}"], workers=1)
        samples = read_samples(out["shards"])
        assert sorted((int(s["cls"]), s["txt"]) for s in samples) == [
            (0, "cat"), (0, "cat"), (1, "dog"), (1, "dog"), (2, "bird"), (2, "bird")]
        for s in samples:
            assert abs(s["png"].mean() - LEVELS[s["txt"]]) < 1


def test_digit_class_names_are_read_as_names_before_indices(tmp_path):
    grey_png(tmp_path / "a.png", 10)
    (tmp_path / "names.txt").write_text("7\n3\n")
    (tmp_path / "t.tsv").write_text("a.png\t3\n")  # the class named "3" (index 1), not index 3
    out = shards.make_target_shards(str(tmp_path / "t.tsv"), str(tmp_path / "out"),
                                    classnames=str(tmp_path / "names.txt"), templates=["{c}"], workers=1)
    (sample,) = read_samples(out["shards"])
    assert (int(sample["cls"]), sample["txt"]) == (1, "3")


def test_target_bad_input_is_named(tmp_path):
    image_folder(tmp_path / "src", per_class=1)
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 class names but .* 3 class folders"):
        shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "o1"), classnames=str(tmp_path / "two.txt"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shards.make_target_shards(str(tmp_path / "nowhere"), str(tmp_path / "o2"))
    (tmp_path / "t.tsv").write_text("src/cat/0.png\tcat\nsrc/dog/0.png\tzebra\n")
    with pytest.raises(ValueError, match="line 2: label 'zebra'"):
        shards.make_target_shards(str(tmp_path / "t.tsv"), str(tmp_path / "o3"), classnames=["cat", "dog"])
    with pytest.raises(ValueError, match="needs class names"):
        shards.make_target_shards(str(tmp_path / "t.tsv"), str(tmp_path / "o4"))
    with pytest.raises(ValueError, match=r"\['cat'\] listed more than once"):
        shards.make_target_shards(str(tmp_path / "t.tsv"), str(tmp_path / "o5"), classnames=["cat", "dog", "cat"])
    (tmp_path / "bad_templates.txt").write_text("a photo of a {c}.\nno placeholder\n")
    with pytest.raises(ValueError, match="bad_templates.txt, template 2 'no placeholder'"):
        shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "o6"),
                                  templates=str(tmp_path / "bad_templates.txt"))


def test_corrupt_images_are_skipped_with_a_counted_warning(tmp_path, caplog):
    image_folder(tmp_path / "src", per_class=2, corrupt=2)
    with caplog.at_level(logging.WARNING):
        out = shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "out"), workers=2)
    assert out["num_samples"] == 6 and len(out["skipped"]) == 2
    assert "skipped 2 unreadable image(s) of 8" in caplog.text and "broken1.png" in caplog.text
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1]
                  for line in (tmp_path / "out" / "skipped.txt").read_text().splitlines()) == ["broken0.png",
                                                                                             "broken1.png"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"000000.tar": 6}


def test_transparent_images_are_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    ext, data = shards.encode_image(buf.getvalue())
    assert ext == "png" and np.asarray(Image.open(io.BytesIO(data))).min() == 255


# -- reference shards and checks ----------------------------------------------------------------------
def test_reference_shards_from_tsv_csv_and_caption_files(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    captions = ['a "quoted" cat', "dogs, two of them", "a bird"]
    for i, caption in enumerate(captions):
        grey_png(tmp_path / "img" / f"{i}.png", 50 * i)
        (tmp_path / "img" / f"{i}.txt").write_text(caption + "\n")
    grey_png(tmp_path / "img" / "uncaptioned.png", 9)
    (tmp_path / "pairs.tsv").write_text("".join(f"img/{i}.png\t{c}\n" for i, c in enumerate(captions)))
    quoted = ['"' + c.replace('"', '""') + '"' for c in captions]
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"img/{i}.png,{c}\n" for i, c in enumerate(quoted)))
    for source in ("pairs.tsv", "pairs.csv", "img"):
        with caplog.at_level(logging.WARNING):
            out = shards.make_ref_shards(str(tmp_path / source), str(tmp_path / f"ref_{source}"),
                                         samples_per_shard=2, workers=1)
        samples = read_samples(out["shards"])
        assert sorted(s["txt"] for s in samples) == sorted(captions), source
        for s in samples:  # each caption stays with its own image
            assert abs(s["png"].mean() - 50 * captions.index(s["txt"])) < 1
        assert out["num_shards"] == 2
    assert "skipped 1 image(s) without a caption file of 4" in caplog.text and "uncaptioned.png" in caplog.text


def img2dataset_shard(path, n, drop_txt=()):
    """A shard laid out as img2dataset writes them: key.jpg, key.txt, key.json per sample."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buf, format="JPEG")
            members = {"jpg": buf.getvalue(), "json": json.dumps({"caption": f"c{i}"}).encode()}
            if i not in drop_txt:
                members["txt"] = f"c{i}".encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_check_ref_shards_counts_img2dataset_shards_as_they_are(tmp_path, caplog):
    img2dataset_shard(tmp_path / "00000.tar", 5)
    img2dataset_shard(tmp_path / "00001.tar", 4, drop_txt={2})
    with caplog.at_level(logging.WARNING):
        stats = shards.check_ref_shards(str(tmp_path / "{00000..00001}.tar"), decode=True)
    assert (stats["samples"], stats["valid"], stats["missing_txt"], stats["sizes_json"]) == (9, 8, 1, "missing")
    assert stats["per_shard"] == {"00000.tar": 5, "00001.tar": 3}
    assert "skipped 1 invalid sample(s) of 9" in caplog.text
    stats = shards.check_ref_shards(str(tmp_path), write_sizes=True)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 3}
    assert shards.check_ref_shards(str(tmp_path))["sizes_json"] == "ok"
    with pytest.raises(FileNotFoundError, match="not found"):
        shards.check_ref_shards(str(tmp_path / "{00000..00002}.tar"))


# -- per-read prompt redraw -----------------------------------------------------------------------------
def test_redraw_draws_new_templates_keeps_the_class_and_passes_other_captions():
    redraw = PromptRedrawTokenizer(as_text, CLASSES, TEMPLATES, seed=0)
    draws = [redraw("a photo of a dog.") for _ in range(40)]
    assert set(draws) == {t.replace("{}", "{c}").format(c="dog") for t in TEMPLATES}
    assert redraw(["bird!", "free text"])[1] == "free text" and redraw(["bird!"])[0].count("bird") == 1
    again = PromptRedrawTokenizer(as_text, CLASSES, TEMPLATES, seed=0)
    assert [again("a photo of a dog.") for _ in range(40)] == draws  # seeded
    other = PromptRedrawTokenizer(as_text, CLASSES, TEMPLATES, seed=1)
    assert [other("a photo of a dog.") for _ in range(40)] != draws


def test_redraw_pickles_and_tokenizes_like_the_wrapped_tokenizer():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    redraw = PromptRedrawTokenizer(tokenizer, CLASSES, TEMPLATES, seed=3)
    clone = pickle.loads(pickle.dumps(redraw))
    assert clone.context_length == tokenizer.context_length == 77  # attributes delegate
    tokens = clone("{c}!".format(c="cat"))
    assert tokens.shape == (1, 77)
    allowed = {tuple(tokenizer(t.replace("{}", "{c}").format(c="cat"))[0].tolist()) for t in TEMPLATES}
    assert {tuple(clone("cat!")[0].tolist()) for _ in range(30)} == allowed


def redraw_loader(urls, redraw, workers):
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                                wds.decode(), wds.to_tuple("__key__", "cls", "txt"), wds.map_tuple(None, int, redraw))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_draws_a_new_template_per_image(tmp_path, workers):
    image_folder(tmp_path / "src", per_class=8)
    out = shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "out"), templates=TEMPLATES,
                                    samples_per_shard=12, workers=1)
    redraw = PromptRedrawTokenizer.from_shards(as_text, out["shards"], seed=0)
    names = redraw.classnames
    torch.manual_seed(0)
    loader = redraw_loader(shards.shard_list(out["shards"]), redraw, workers)
    epochs = [{key: (cls, caption) for key, cls, caption in loader} for _ in range(2)]
    assert set(epochs[0]) == set(epochs[1]) and len(epochs[0]) == 24
    for epoch in epochs:
        for cls, caption in epoch.values():  # the class never changes
            assert caption in {t.format(c=names[cls]) for t in redraw.templates}
    changed = sum(epochs[0][k][1] != epochs[1][k][1] for k in epochs[0])
    assert changed >= 8  # 24 images x 3/4 chance of a different template each: 18 expected


def test_from_shards_needs_the_metadata_files(tmp_path):
    image_folder(tmp_path / "src", per_class=1)
    out = shards.make_target_shards(str(tmp_path / "src"), str(tmp_path / "out"), templates=TEMPLATES, workers=1)
    for spec in (str(tmp_path / "out"), out["shards"], str(tmp_path / "out" / "000000.tar")):
        assert PromptRedrawTokenizer.from_shards(as_text, spec).classnames == ["bird", "cat", "dog"]
    (tmp_path / "out" / "templates.txt").unlink()
    with pytest.raises(FileNotFoundError, match="templates.txt"):  # the plugin then keeps captions as stored
        PromptRedrawTokenizer.from_shards(as_text, out["shards"])


def test_write_samples_rolls_shards_keys_in_order_and_writes_sizes(tmp_path):
    samples = ({"txt": f"caption {i}", "cls": str(i % 2)} for i in range(5))  # a generator is enough
    summary = shards.write_samples(tmp_path / "out", samples, 2)
    assert summary == {"shards": str(tmp_path / "out" / "{000000..000002}.tar"), "num_samples": 5, "num_shards": 3,
                       "dir": str(tmp_path / "out")}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"000000.tar": 2, "000001.tar": 2,
                                                                         "000002.tar": 1}
    got = list(wds.WebDataset(summary["shards"], shardshuffle=False).decode().to_tuple("__key__", "txt"))
    assert got == [(f"{i:09d}", f"caption {i}") for i in range(5)]
    empty = shards.write_samples(tmp_path / "empty", [], 2)
    assert empty["num_samples"] == 0 and not (tmp_path / "empty" / "sizes.json").exists()
    with pytest.raises(ValueError, match="samples_per_shard must be >= 1"):
        shards.write_samples(tmp_path / "zero", [{"txt": "x"}], 0)


def test_pre_resized_reference_shards_give_the_eval_transforms_pixels(tmp_path, tiny_model_dir):
    """--resize N stores what the eval transform's resize would make of each image, so its own resize then
    changes nothing: the preprocessed tensors are equal. Smaller images are stored as they are."""
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    size = preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    shapes = {"wide": (2 * size + 7, 3 * size + 5), "tall": (4 * size + 1, 2 * size + 3), "small": (size - 2, size)}
    for name, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
        (tmp_path / "img" / f"{name}.txt").write_text(name)
    out = shards.make_ref_shards(str(tmp_path / "img"), str(tmp_path / "ref"), workers=1, resize=size)
    for sample in wds.WebDataset(out["shards"].replace("{000000..000000}", "000000"), shardshuffle=False):
        name = sample["txt"].decode()
        original = Image.open(tmp_path / "img" / f"{name}.png").convert("RGB")
        stored = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        assert min(stored.size) == min(size, min(original.size)), name
        assert torch.equal(preprocess(stored), preprocess(original)), name
        if name == "small":
            assert sample["png"] == (tmp_path / "img" / "small.png").read_bytes()
    with pytest.raises(ValueError, match="--resize 0"):
        shards.make_ref_shards(str(tmp_path / "img"), str(tmp_path / "ref0"), workers=1, resize=0)
