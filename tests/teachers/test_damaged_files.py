"""Damaged teacher files and caches: one line naming the file and what to do, before training."""
import json
import random
import os

import pytest
import torch

from openclip_robust.teachers import cache as teacher_cache
from openclip_robust.teachers.vision import check_teacher_flags, looks_like_weights


def test_random_bytes_as_kernel_teacher_file_is_a_cli_error(tmp_path):
    garbage = tmp_path / "teacher.safetensors"
    garbage.write_bytes(b"\x00" + random.Random(0).randbytes(4095))  # no zip, pickle or safetensors start
    with pytest.raises(ValueError, match=rf"--kernel-teacher-pretrained {garbage}: not a safetensors or torch "
                                         rf"checkpoint file .*; give the teacher's weights as"):
        check_teacher_flags("test_vit", str(garbage))


def test_real_weight_files_pass_the_sniff(tmp_path):
    from safetensors.torch import save_file
    t = {"w": torch.ones(3)}
    save_file(t, str(tmp_path / "a.safetensors"))
    torch.save(t, tmp_path / "b.pth")
    torch.save(t, tmp_path / "c.pth", _use_new_zipfile_serialization=False)
    assert all(looks_like_weights(str(tmp_path / n)) for n in ("a.safetensors", "b.pth", "c.pth"))


def test_random_bytes_as_cache_manifest(tmp_path):
    (tmp_path / teacher_cache.MANIFEST).write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match=rf"--ref-teacher-cache {tmp_path}: .*manifest.json is not a cache manifest "
                                         rf"\(\w+\); the cache is damaged: rebuild it with"):
        teacher_cache.read_manifest(str(tmp_path))


def test_random_bytes_as_cache_part(tmp_path):
    manifest = {"format": teacher_cache.FORMAT_VERSION, "kind": "reference", "provenance": {}, "shards": [],
                "parts": ["part-000000.pt"]}
    (tmp_path / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "part-000000.pt").write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match=rf"--ref-teacher-cache {tmp_path}: part .*part-000000.pt does not load "
                                         rf"\(\w+\); the cache is damaged: rebuild it"):
        teacher_cache.TeacherCache(str(tmp_path))
