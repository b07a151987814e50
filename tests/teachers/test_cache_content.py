"""A teacher cache is checked against content, not only names and keys: a cache file whose bytes rotted in
place, or data shards re-packed under the same names and keys with other images, stop the run with one line
naming the data shard and the cache file; a good cache keeps loading (tests/teachers/test_cache.py trains
with one)."""
import os
import shutil
from types import SimpleNamespace

import open_clip
import pytest
import torch

from openclip_robust.data.reference import ReferenceStream
from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import photo_samples
from openclip_robust.teachers import cache as teacher_cache
from openclip_robust.teachers.cache import TeacherCache, build_cache
from tests.test_guards import run_training
from tests.test_training_e2e import train_args


@pytest.fixture
def built(tmp_path, tiny_model_dir):
    """Reference shards of the photos (3 x 8) and their cache, in this test's own folder."""
    shards = write_samples(str(tmp_path / "ref"), photo_samples(24), 8)["shards"]
    cache_dir = str(tmp_path / "cache")
    build_cache(f"local-dir:{tiny_model_dir}", shards, cache_dir, batch_size=8, workers=0)
    return SimpleNamespace(shards=shards, dir=cache_dir, folder=tmp_path / "ref")


def stream(cache, urls, tiny_model_dir, workers=0):
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    args = SimpleNamespace(rank=0, seed=0, ref_batch_size=4, ref_workers=workers, device="cpu",
                           data_failure_limit=200)
    return ReferenceStream(args, urls, preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}"),
                           teacher_cache=cache)


def rot_in_place(path, row=3):
    """Change one byte of the stored image_features of `row`: the zip stays whole (torch.load does not check
    its CRCs), the bytes are another embedding's."""
    stored = torch.load(path, weights_only=True)
    value = stored["image_features"][row].numpy().tobytes()
    data = bytearray(open(path, "rb").read())
    at = data.find(value)
    assert at > 0 and data.count(value) == 1
    data[at + 1] ^= 0x40
    with open(path, "r+b") as f:  # in place: same size, same name
        f.write(data)
    rotted = torch.load(path, weights_only=True, mmap=True)
    assert not torch.equal(rotted["image_features"][row], stored["image_features"][row])  # it loads, silently wrong


def test_a_cache_file_rotted_in_place_is_refused_naming_it_and_its_data_shard(built, tiny_model_dir):
    cache = TeacherCache(built.dir)
    url = cache.manifest["shards"][1]
    path = os.path.join(built.dir, cache.manifest["files"][1])
    rot_in_place(path)
    cache.check({}, cache.manifest["shards"])  # still a whole zip file: the quick check before training passes
    ref = stream(TeacherCache(built.dir), [url], tiny_model_dir)
    with pytest.raises(ValueError) as e:
        ref.next_batch()
    assert str(e.value) == (
        f"--ref-teacher-cache {built.dir}: cache file {path} (of --ref-data shard {url}) does not match its recorded "
        f"checksum: it changed on disk since the build; rebuild the cache with `openclip-robust cache-teacher "
        f"--ref-data ...` and this run's model, weights and data flags")
    # the other shards' files are intact and still read
    good = stream(TeacherCache(built.dir), [cache.manifest["shards"][0]], tiny_model_dir)
    assert len(good.next_batch().keys) == 4


def repack_with_other_images(folder):
    """The same shard names and sample keys (000000000...), other photos under them: the round shifted."""
    for name in os.listdir(folder):
        os.remove(folder / name)
    write_samples(str(folder), photo_samples(36)[12:], 8)


def test_reference_shards_repacked_under_the_same_names_and_keys_are_refused(built, tiny_model_dir):
    cache = TeacherCache(built.dir)
    before = {u: cache.shard(u).keys for u in cache.manifest["shards"]}
    repack_with_other_images(built.folder)
    fresh = TeacherCache(built.dir)
    fresh.check({}, fresh.manifest["shards"])  # names, keys and cache files all as built
    assert {u: fresh.shard(u).keys for u in fresh.manifest["shards"]} == before
    url = fresh.manifest["shards"][0]
    with pytest.raises(ValueError) as e:
        stream(fresh, [url], tiny_model_dir).next_batch()
    path = os.path.join(built.dir, fresh.manifest["files"][0])
    assert str(e.value).startswith(
        f"--ref-teacher-cache {built.dir}: --ref-data shard {url} is not the shard cache file {path} was built from "
        f"(sample '0000000")
    assert str(e.value).endswith("holds other content under the same key: re-packed or changed); rebuild the cache "
                                 "with `openclip-robust cache-teacher --ref-data ...` and this run's model, weights and "
                                 "data flags")
    assert "\n" not in str(e.value)


def test_a_changed_caption_matters_to_a_reference_cache_and_not_to_a_kernel_teacher_cache(built):
    cache = TeacherCache(built.dir)
    url = cache.manifest["shards"][0]
    key = cache.shard(url).keys[0]
    sample = {"__url__": url, "__key__": key, "png": photo_samples(1)[0]["png"],
              "txt": photo_samples(1)[0]["txt"].encode(), "json": b'{"any": "metadata"}'}
    assert cache.attach(dict(sample))[teacher_cache.ROW_KEY][1] == 0  # as built; other members do not count
    with pytest.raises(ValueError, match="holds other content under the same key"):
        cache.attach({**sample, "txt": b"another caption"})
    image_only = teacher_cache.sample_digest(sample, with_text=False)
    assert image_only == teacher_cache.sample_digest({**sample, "txt": b"another caption"}, with_text=False)
    assert image_only != teacher_cache.sample_digest({**sample, "png": photo_samples(2)[1]["png"]}, with_text=False)


@pytest.mark.slow
def test_training_on_repacked_reference_shards_stops_naming_both_files(tmp_path, built, tiny_model_dir, target_shards):
    """Through upstream's loop, the reference stream in a loader worker: the run stops before any checkpoint."""
    repack_with_other_images(built.folder)
    argv = train_args(tmp_path, "repacked", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      built.shards, "--ref-batch-size", "8", "--precision", "fp32", "--ref-teacher-cache", built.dir,
                      "--ref-workers", "1")
    code, log = run_training(tmp_path, "repacked", *argv, timeout=300)  # bounded: a hang fails the test
    assert code != 0
    assert (f"CacheError: --ref-teacher-cache {built.dir}: --ref-data shard {built.folder}/00000" in log
            and f"is not the shard cache file {built.dir}/shards/0000" in log and "rebuild the cache" in log), log[-3000:]
    assert not (tmp_path / "logs" / "repacked" / "checkpoints" / "epoch_1.pt").exists()


def test_a_good_cache_copied_elsewhere_still_loads(built, tiny_model_dir, tmp_path):
    """Checksums are of the files' bytes, not their paths or times: a copied cache is as good."""
    copy = str(tmp_path / "copy")
    shutil.copytree(built.dir, copy)
    cache = TeacherCache(copy)
    batch = stream(cache, cache.manifest["shards"], tiny_model_dir).next_batch()
    assert batch.frozen["image_features"].shape == (4, 32)
