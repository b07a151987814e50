"""A frozen timm vision teacher (e.g. DINOv2) loaded from a local file, with its own preprocessing.

The teacher sees each training image with *its* normalisation and resolution (timm's data config),
derived from the same decoded image the student sees: the student's CLIP-normalised batch is
mapped back to pixels in [0, 1], resized to the teacher's input size and normalised with the
teacher's mean and std. (KUEA's code fed the teacher CLIP's normalisation instead.)
"""
import os
import sys

import timm
import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg, load_state_dict
from torch import nn

from openclip_robust.untrusted import is_refused_pickle, refusal


def check_teacher_flags(name, path, image_size=None):
    """Errors a user can fix before anything is built: unknown timm name, missing weights file."""
    if not name:
        raise ValueError("--robust-loss kernel needs --kernel-teacher: a timm model name, "
                         "e.g. vit_large_patch14_reg4_dinov2.lvd142m")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"--kernel-teacher {name!r} is not a timm model name"
                         + (f"; close names: {', '.join(close)}" if close else ""))
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):  # is_model ignores the tag; create_model would not
        tags = timm.list_pretrained(f"{arch}.*")
        raise ValueError(f"--kernel-teacher {name!r}: timm has no pretrained tag {tag!r} for {arch} (the tag "
                         f"sets the teacher's mean, std and resolution); known: {', '.join(tags) or 'none'}")
    if not path:
        raise ValueError("--robust-loss kernel needs --kernel-teacher-pretrained: the teacher's weights as a "
                         "local .safetensors/.pth/.bin file (nothing is downloaded at run time)")
    if not os.path.isfile(path):
        raise ValueError(f"--kernel-teacher-pretrained {path}: file not found")
    if not looks_like_weights(path):
        raise ValueError(f"--kernel-teacher-pretrained {path}: not a safetensors or torch checkpoint file (its first "
                         f"bytes are neither); give the teacher's weights as .safetensors/.pth/.bin")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--kernel-teacher-image-size {image_size}: must be >= 1")


def looks_like_weights(path):
    """Whether the file starts like a safetensors file (u64 header length, then a JSON header) or a torch
    checkpoint (a zip archive, or a legacy pickle): a cheap check before anything is built."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return True
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def teacher_input_size(name, image_size=None):
    """(height, width) the teacher sees, without building it: --kernel-teacher-image-size, else the
    resolution of timm's pretrained config for `name` (what VisionTeacher resolves from the built model)."""
    if image_size:
        return (image_size, image_size)
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.input_size:
        return tuple(cfg.input_size[1:])
    return tuple(timm.data.resolve_data_config({}, model=create_timm_model(name, None))["input_size"][1:])


def create_timm_model(name, image_size):
    """timm model with pooled outputs (num_classes=0); ViTs built for `image_size` where given."""
    if image_size is None:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError:  # convolutional nets take no img_size: they accept any input size as they are
        return timm.create_model(name, pretrained=False, num_classes=0)


def load_teacher_weights(model, name, path):
    """Strict load through timm's own checkpoint loader and the architecture's checkpoint filter,
    as timm's pretrained loading does (original DINOv2 checkpoints are converted, position
    embeddings resampled to the model's grid), minus the classifier the pooled model lacks."""
    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as e:
        if is_refused_pickle(e, path):
            raise refusal(path, "--kernel-teacher-pretrained") from None
        raise ValueError(f"--kernel-teacher-pretrained {path}: not a readable checkpoint ({e})") from e
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            raise ValueError(f"--kernel-teacher-pretrained {path} does not fit --kernel-teacher {name}: "
                             f"timm's checkpoint filter failed ({e})") from e
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ("head", "fc")
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(c + "." for c in classifier))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every tensor, the first few say enough
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"--kernel-teacher-pretrained {path} does not fit --kernel-teacher {name}: "
                         + "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")) from None
    if missing or unexpected:
        raise ValueError(f"--kernel-teacher-pretrained {path} does not fit --kernel-teacher {name}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class VisionTeacher(nn.Module):
    """timm model (num_classes=0: pooled features) + the view of the student's batch it expects."""

    def __init__(self, name, path, student_mean, student_std, image_size=None):
        super().__init__()
        self.model = create_timm_model(name, image_size)
        load_teacher_weights(self.model, name, path)
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.size = (image_size, image_size) if image_size else tuple(cfg["input_size"][1:])
        self.interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("student_mean", torch.tensor(student_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)
        self.dim = self._check_output()

    def _check_output(self):
        with torch.no_grad():
            out = self.model(torch.zeros(2, 3, *self.size))
        if not (torch.is_tensor(out) and out.ndim == 2 and out.shape[0] == 2):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"--kernel-teacher: the timm model returns {shape} for a batch of 2; the kernel needs "
                             f"pooled features of shape [batch, dim] (a model built with num_classes=0)")
        return out.shape[1]

    def train(self, mode=True):
        return super().train(False)  # always eval: BatchNorm / dropout never change the teacher

    def view(self, student_images):
        """The teacher's input from the student's normalised batch (same decoded pixels)."""
        pixels = (student_images.float() * self.student_std + self.student_mean).clamp(0, 1)
        if pixels.shape[-2:] != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode=self.interpolation, align_corners=False,
                                   antialias=True).clamp(0, 1)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, student_images):
        return self.model(self.view(student_images)).float()
