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


def one_shard_cache(tmp_path, fmt=teacher_cache.FORMAT_VERSION):
    """A manifest over one data shard /data/000000.tar, with its file name: (cache, the file's path)."""
    manifest = {"format": fmt, "kind": "reference", "provenance": {}, "dtype": "fp32",
                "dims": {"image_features": 4, "text_features": 4}, "shards": ["/data/000000.tar"],
                "files": ["shards/00000-000000.tar.pt"], "counts": [2], "samples": 2, "checksums": ["0" * 64],
                "data_digests": ["0" * 64]}
    (tmp_path / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "shards").mkdir()
    return tmp_path / "shards" / "00000-000000.tar.pt"


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_shard_file_is_one_error_before_training_and_in_the_loader(tmp_path, damage):
    path = one_shard_cache(tmp_path)
    if damage == "random":
        path.write_bytes(os.urandom(2048))
    else:
        torch.save({"keys": ["a", "b"], "digests": torch.zeros(2, 16, dtype=torch.uint8),
                    "image_features": torch.ones(2, 4), "text_features": torch.ones(2, 4)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    cache = teacher_cache.TeacherCache(str(tmp_path))  # opening reads the manifest only
    message = (rf"--ref-teacher-cache {tmp_path}: shard file {path} does not load \(\w+\); the cache is damaged: "
               rf"rebuild it with `openclip-robust cache-teacher --ref-data")
    with pytest.raises(ValueError, match=message):
        cache.check({}, ["/elsewhere/000000.tar"])  # what training checks, before step 1
    with pytest.raises(ValueError, match=message):
        teacher_cache.ShardRows(str(path), cache.features, cache._damaged)  # what a loader worker meets
    with pytest.raises(ValueError, match=rf"cache file {path} \(of --ref-data shard /data/000000.tar\) does not match "
                                         rf"its recorded checksum: it changed on disk since the build; rebuild"):
        cache.lookup("/data/000000.tar", ["a"])  # the checksum is checked first


def test_missing_shard_file_and_old_format_are_refused_on_opening(tmp_path):
    path = one_shard_cache(tmp_path)
    with pytest.raises(ValueError, match=rf"shard file {path} is missing \(1 of 1\); the cache is damaged: rebuild"):
        teacher_cache.TeacherCache(str(tmp_path))
    (tmp_path / "old").mkdir()
    one_shard_cache(tmp_path / "old", fmt=1)
    with pytest.raises(ValueError, match=r"cache format 1 \(one part per build rank, before per-shard files\), this "
                                         r"version reads format 3; rebuild it into a new folder with"):
        teacher_cache.TeacherCache(str(tmp_path / "old"))
    (tmp_path / "v2").mkdir()
    one_shard_cache(tmp_path / "v2", fmt=2)
    with pytest.raises(ValueError, match=r"cache format 2 \(no content digests, before format 3\), this version reads "
                                         r"format 3; rebuild it into a new folder with `openclip-robust cache-teacher"):
        teacher_cache.TeacherCache(str(tmp_path / "v2"))
