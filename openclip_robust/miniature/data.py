"""The miniature's data: openclipart pairs and splits, Fashion-MNIST and its OOD shifts.

openclipart: a category is the first two folder levels (``animals/mammals``; top-level files:
the top folder). Zero-shot, as in the paper (its Caltech-101, Pets, ... are classes fine-tuning never
sees, whose concepts CLIP's pre-training covered but whose test images it never saw): the zero-shot
categories (HELD_OUT) are never fine-tuned on, a share of each one's clip arts joins the alignment pool
(model A knows the concept) and the rest are evaluation images no training stage sees. The nameable
categories not drawn for zero-shot are "novel concepts": none of their images reaches alignment. Pairs of
the other categories are split at random into alignment-train (also the reference set, the analogue of
CC3M), alignment-val (early stopping) and held-out pairs; the retrieval/RSA set = held-out pairs +
zero-shot evaluation images, never seen by any training stage.
"""
import gzip
import html
import os
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from openclip_robust.miniature import assets

# Zero-shot classes: category folder -> prompt name. Moderate-size folders with a nameable concept.
HELD_OUT = {
    "animals/mammals": "mammals", "food/fruit": "fruit", "recreation/music": "musical instruments",
    "food/desserts": "desserts", "people/clothing": "clothing", "animals/birds": "birds",
    "food/beverages": "drinks", "animals/bugs": "insects", "recreation/sports": "sports",
    "transportation/roadsigns": "road signs", "buildings/homes": "houses", "transportation/boating": "boats",
    "transportation/vehicles": "cars", "tools/weapons": "weapons", "signs_and_symbols/weather": "weather symbols",
    "plants/flowers": "flowers", "food/breads_and_carbs": "bread", "recreation/toys": "toys",
    "signs_and_symbols/clocks": "clocks", "animals/fish": "fish", "education/books": "books",
    "animals/dinosaurs": "dinosaurs", "food/vegetables": "vegetables", "plants/trees": "trees",
    "office/telephone": "telephones",
}
# --split-seed N (N > 0) holds out ZERO_SHOT_COUNT categories drawn from HELD_OUT and these instead: nameable
# folders of 10-260 clip arts (the large ones, computer/icons, shapes/stars and flags, always stay in alignment).
MORE_NAMEABLE = {
    "shapes/arrows": "arrows", "computer/buttons": "buttons", "people/stickmen": "stick figures", "computer/hardware": "computer hardware",
    "shapes/jigsaw": "jigsaw pieces", "people/smilies": "smiley faces", "recreation/holiday": "holiday decorations",
    "food/meats_and_eggs": "meat and eggs", "recreation/party": "party decorations", "people/bodypart": "body parts",
    "shapes/callouts": "speech bubbles", "geography/astronomy": "planets", "buildings/furniture": "furniture",
    "electronics/bulb": "light bulbs",
}
ZERO_SHOT_COUNT = len(HELD_OUT)

# --target clipart (the ImageNet-like task): classes model A is aligned on, each with unseen images held out
# for fine-tuning and test. Measured (64 px, 400 unseen images, exploration before this task existed): model A
# scores 42.5% zero-shot on them (chance 10%); grey 39.5, outline 30.8, inverted 39.0, blur 40.3.
TARGET_CLASSES = {
    "shapes/stars": "stars", "signs_and_symbols/flags": "flags", "recreation/games": "games", "people": "people",
    "signs_and_symbols/map_symbols": "map symbols", "computer": "computers", "geography": "maps",
    "special/patterns": "patterns", "office": "office supplies", "tools": "tools",
}
TARGET_SPLIT = {"align": 0.25, "train": 0.40, "val": 0.10, "test": 0.25}  # of each class's (capped) images


def split_target(items, per_class, seed=0):
    """Each TARGET_CLASSES class's clip arts (at most `per_class`, seeded) split by TARGET_SPLIT: "align"
    stays with the alignment pairs (model A knows the concept, as CLIP knows ImageNet's), the others never
    reach alignment. Returns ({"align", "train", "val", "test"}: item lists, the non-target items)."""
    rng = random.Random(seed)
    out = {k: [] for k in TARGET_SPLIT}
    for cat in TARGET_CLASSES:
        group = [it for it in items if it[1] == cat]
        group = rng.sample(group, min(per_class, len(group)))
        start = 0
        for k, share in TARGET_SPLIT.items():
            n = round(share * len(group)) if k != "test" else len(group) - start
            out[k] += group[start:start + n]
            start += n
    return out, [it for it in items if it[1] not in TARGET_CLASSES]


def held_out_categories(split_seed=0):
    """The zero-shot categories ({folder: prompt name}): HELD_OUT for split seed 0, else ZERO_SHOT_COUNT drawn
    (seeded) from HELD_OUT and MORE_NAMEABLE, in folder order."""
    if split_seed == 0:
        return dict(HELD_OUT)
    pool = {**HELD_OUT, **MORE_NAMEABLE}
    chosen = set(random.Random(split_seed).sample(sorted(pool), ZERO_SHOT_COUNT))
    return {c: pool[c] for c in sorted(chosen)}


def novel_categories(split_seed=0):
    """The "novel concepts" ({folder: prompt name}): the nameable categories (HELD_OUT, MORE_NAMEABLE) not drawn
    for zero-shot; none of their images reaches alignment (MORE_NAMEABLE for split seed 0)."""
    held = held_out_categories(split_seed)
    pool = {**HELD_OUT, **MORE_NAMEABLE}
    return {c: pool[c] for c in sorted(pool) if c not in held}


CLIPART_TEMPLATES = ["clip art of {c}.", "a drawing of {c}.", "an illustration of {c}.", "a cartoon of {c}.",
                     "an icon of {c}.", "a picture of {c}."]
FASHION_CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_TEMPLATES = ["a photo of a {c}.", "a black and white photo of a {c}.", "a product photo of a {c}.",
                     "a low resolution photo of a {c}.", "a picture of a {c}.", "a photo of the {c}, a type of clothing."]

_TITLE = re.compile(r"<dc:title>\s*([^<]*?)\s*</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>\s*([^<]*?)\s*</rdf:li>", re.S)


def category_of(rel):
    parts = Path(rel).parts[:-1]
    return "/".join(parts[:2]) if parts else ""


def caption_of(svg_text, fallback):
    """First <dc:title> (the work's, before agents' names) plus up to 4 <dc:subject> keywords."""
    titles = _TITLE.findall(svg_text)
    title = html.unescape(titles[0]).strip() if titles else ""
    subject = _SUBJECT.search(svg_text)
    words = [html.unescape(w).strip() for w in _LI.findall(subject.group(1))] if subject else []
    words = [w for w in words if w and w.lower() != title.lower()][:4]
    caption = title or fallback.replace("_", " ")
    return f"{caption} ({', '.join(words)})" if words else caption


def openclipart_items(png_root=assets.OPENCLIPART_PNG, svg_root=assets.OPENCLIPART_SVG):
    """[(rel path, category, caption)] for real PNG files (symlinked duplicates skipped), sorted."""
    items = []
    for dirpath, _, files in os.walk(png_root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".png") or os.path.islink(path):
                continue
            rel = os.path.relpath(path, png_root)
            svg = os.path.join(svg_root, rel[:-4] + ".svg")
            try:
                text = Path(svg).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            items.append((rel, category_of(rel), caption_of(text, Path(rel).stem)))
    items.sort()
    if not items:
        raise FileNotFoundError(f"no PNG files under {png_root}: is openclipart-png installed?")
    return items


def split_openclipart(items, val_pairs, heldout_pairs, seed=0, held_out=HELD_OUT, novel=(), zeroshot_align_share=0.0):
    """{"align_train", "align_val", "heldout_pairs", "zeroshot", "novel"}: lists of (rel, category, caption).

    "zeroshot": the `held_out` categories' evaluation images; of each such category, a share
    `zeroshot_align_share` (seeded, at least one image left to evaluate) joins the alignment pool (0: none,
    the concept stays unseen too). "novel": every image of the `novel` categories. The other pairs are split
    at random (`seed`) into alignment-val, held-out pairs and alignment-train."""
    rng = random.Random(seed)
    zeroshot, rest = [], []
    for cat in held_out:
        group = [it for it in items if it[1] == cat]
        n_align = max(0, min(round(zeroshot_align_share * len(group)), len(group) - 1))
        chosen = set(rng.sample(range(len(group)), n_align))
        rest += [it for i, it in enumerate(group) if i in chosen]
        zeroshot += [it for i, it in enumerate(group) if i not in chosen]
    novel_items = [it for it in items if it[1] in novel]
    rest += [it for it in items if it[1] not in held_out and it[1] not in novel]
    rest.sort()
    rng.shuffle(rest)
    zeroshot.sort()
    return {"align_val": rest[:val_pairs], "heldout_pairs": rest[val_pairs:val_pairs + heldout_pairs],
            "align_train": rest[val_pairs + heldout_pairs:], "zeroshot": zeroshot, "novel": novel_items}


def cap_per_category(items, per_category, seed=0):
    """At most `per_category` items of each category (seeded choice), in the input order."""
    by_cat = {}
    for it in items:
        by_cat.setdefault(it[1], []).append(it)
    rng = random.Random(seed)
    keep = {it for group in by_cat.values() for it in rng.sample(group, min(per_category, len(group)))}
    return [it for it in items if it in keep]


def pixel_count(src):
    """Width x height from the image header (nothing decoded); 0 if unreadable."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(src) as im:
            return im.width * im.height
    except Exception:  # render_clipart records the unreadable ones
        return 0


def render_clipart(src, dst, size):
    """Composite onto white (transparent pixels would turn black) and shrink to `size` on the long side.

    Shrunk first, in premultiplied alpha (RGBa), then composited: compositing and resampling are both
    linear, so this is the composite of the full image to rounding (mean difference 0.13 of 255 over
    300 clip arts), without compositing every full-size pixel (a 21k x 30k package PNG: 8 s, not 18 s).
    """
    Image.MAX_IMAGE_PIXELS = None  # a few package PNGs are huge but genuine
    with Image.open(src) as im:
        small = (im if im.mode == "RGBA" else im.convert("RGBA")).convert("RGBa")
    small.thumbnail((size, size), Image.BICUBIC)
    small = small.convert("RGBA")
    out = Image.new("RGB", small.size, (255, 255, 255))
    out.paste(small, mask=small.getchannel("A"))
    out.save(dst)


# -- Fashion-MNIST ---------------------------------------------------------------------------------
def read_fashion(split, root=assets.FASHION_DIR):
    """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' or 'test' (idx gzip files)."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def shift_inverted(img):
    """Catalogue look: dark product on a white background (the originals are light on black)."""
    return 255 - img


def shift_outline(img):
    """Edge drawing: gradient magnitude of the lightly blurred image, dark lines on white."""
    x = img.astype(np.float32)  # [N, 28, 28] or [28, 28]
    a, b = x.ndim - 2, x.ndim - 1
    x = (x + np.roll(x, 1, a) + np.roll(x, 1, b) + np.roll(np.roll(x, 1, a), 1, b)) / 4
    gy, gx = np.gradient(x, axis=(a, b))
    mag = np.hypot(gx, gy)
    peak = np.maximum(mag.max(axis=(a, b), keepdims=True), 1e-6)
    return (255 * (1 - np.clip(2 * mag / peak, 0, 1))).astype(np.uint8)


OOD_SHIFTS = {"inverted": shift_inverted, "outline": shift_outline}


def clipart_grey(im):
    return ImageOps.grayscale(im).convert("RGB")


def clipart_outline(im):
    """Edge drawing: dark edges on white (the drawing's contours without its fills)."""
    edges = ImageOps.grayscale(im).filter(ImageFilter.FIND_EDGES)
    return ImageOps.invert(ImageOps.autocontrast(edges)).convert("RGB")


def clipart_inverted(im):
    return ImageOps.invert(im.convert("RGB"))


def clipart_blur(im):
    return im.filter(ImageFilter.GaussianBlur(2))


# the same classes, other renderings (the analogue of ImageNet's sketch / rendition / ... shifts)
CLIPART_SHIFTS = {"grey": clipart_grey, "outline": clipart_outline, "inverted": clipart_inverted,
                  "blur": clipart_blur}


def write_image_table(rows, out_dir, name):
    """Write images (uint8 arrays) as PNGs under out_dir/name/ and a TSV path<TAB>label; return the TSV."""
    folder = Path(out_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (array, label) in enumerate(rows):
        path = folder / f"{i:06d}.png"
        Image.fromarray(array).save(path)
        lines.append(f"{path.name}\t{label}\n")
    tsv = folder / "labels.tsv"
    tsv.write_text("".join(lines))
    return tsv


def fashion_subsets(n_train, n_val, n_test, seed=0):
    """Disjoint train/val indices from the train split (seeded), first n_test of the test split."""
    images, labels = read_fashion("train")
    order = np.random.RandomState(seed).permutation(len(labels))
    test_images, test_labels = read_fashion("test")
    return {"train": (images[order[:n_train]], labels[order[:n_train]]),
            "val": (images[order[n_train:n_train + n_val]], labels[order[n_train:n_train + n_val]]),
            "test": (test_images[:n_test], test_labels[:n_test])}
