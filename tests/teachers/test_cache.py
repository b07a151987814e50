"""The teacher cache: cached frozen embeddings give the same training losses; a stale cache is refused."""
import hashlib
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import open_clip
import pytest
import torch

from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager

from openclip_robust.data.reference import ReferenceStream
from openclip_robust.data.shard_format import tar_samples
from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import photo_samples, tiny_model
from openclip_robust.plugin import RobustPlugin
from openclip_robust.teachers import cache as teacher_cache
from openclip_robust.teachers.cache import (
    TeacherCache, assert_deterministic, build_cache, check_provenance, preprocess_fingerprint)
from test_training_e2e import logged, run_main, train_args



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_model_dir, ref_shards):
    out = str(tmp_path_factory.mktemp("teacher") / "cache")
    build_cache(f"local-dir:{tiny_model_dir}", ref_shards, out, batch_size=20, workers=1)
    return out


def ref_args(method, ref_shards, *extra):
    lam = ["--dive-lambda", "10"] if method == "dive" else []
    return ["--robust-loss", method, "--ref-data", ref_shards, "--ref-batch-size", "8", "--precision", "fp32",
            *lam, *extra]


def test_cache_holds_the_frozen_embeddings_of_every_sample(cache_dir, tiny_model_dir, ref_shards):
    cache = TeacherCache(cache_dir)
    assert len(cache) == 48 and cache.manifest["samples"] == 48
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}", output_dict=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    import webdataset as wds
    sample = next(iter(wds.WebDataset(ref_shards.replace("{000000..000002}", "000001"), shardshuffle=False)
                       .decode("pilrgb")))
    with torch.no_grad():
        want = model(preprocess(sample["png"])[None], tokenizer([sample["txt"]]))
    got = cache.lookup(sample["__url__"], [sample["__key__"]])
    for name in ("image_features", "text_features"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="sample key 'nope' of .*000001.tar is not cached; rebuild the cache"):
        cache.lookup(sample["__url__"], ["nope"])


@pytest.mark.slow
@pytest.mark.parametrize("method,keys", [("dive", ["Contrastive_loss", "Dive_avl", "Dive_pvl", "Dive_u_norm"]),
                                         ("snd", ["Contrastive_loss", "Snd_loss"])])
def test_cached_run_gives_the_same_losses(tmp_path, tiny_model_dir, target_shards, ref_shards, cache_dir, method,
                                          keys):
    # upstream's sample shuffle is unseeded: one step per epoch over all 64 target samples makes the
    # target batch the same set in both runs (the reference stream is seeded)
    kw = dict(epochs=3, batch=64, samples=64)
    assert run_main(train_args(tmp_path, "plain", tiny_model_dir, target_shards, *ref_args(method, ref_shards),
                               **kw)) is None
    assert run_main(train_args(tmp_path, "cached", tiny_model_dir, target_shards,
                               *ref_args(method, ref_shards, "--ref-teacher-cache", cache_dir), **kw)) is None
    assert "frozen reference embeddings from" in (tmp_path / "logs" / "cached" / "out.log").read_text()
    for key in keys:
        plain, cached = logged(tmp_path, "plain", key), logged(tmp_path, "cached", key)
        assert len(plain) == 3, (key, plain)
        assert cached == pytest.approx(plain, rel=1e-3, abs=1e-6), key
    if method == "dive":
        assert min(logged(tmp_path, "plain", "Dive_avl")[1:]) > 1e-4  # the comparison is not vacuous
    ref_wait = (tmp_path / "logs" / "cached" / "out.log").read_text().count("Reference data (t):")
    assert ref_wait == 3  # one per step with --log-every-n-steps 1


@pytest.mark.slow
def test_cache_of_other_weights_is_refused(tmp_path, target_shards, ref_shards, cache_dir):
    other = tiny_model(str(tmp_path / "other_model"), seed=1)
    recorded = TeacherCache(cache_dir).manifest["provenance"]["weights_sha256"]
    with pytest.raises(ValueError, match="stale cache, its weights_sha256 differs") as e:
        run_main(train_args(tmp_path, "stale", other, target_shards,
                            *ref_args("dive", ref_shards, "--ref-teacher-cache", cache_dir)))
    assert recorded in str(e.value) and "cache-teacher" in str(e.value)
    assert not (tmp_path / "logs" / "stale" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.slow
def test_cache_with_other_preprocessing_is_refused(tmp_path, tiny_model_dir, target_shards, ref_shards, cache_dir):
    with pytest.raises(ValueError, match=r"its preprocess differs(.|\n)*mean=\[0\.5, 0\.5, 0\.5\]"):
        run_main(train_args(tmp_path, "stale", tiny_model_dir, target_shards, "--image-mean", "0.5", "0.5", "0.5",
                            *ref_args("dive", ref_shards, "--ref-teacher-cache", cache_dir)))


def test_cache_of_another_frozen_forward_precision_is_refused(tmp_path, tiny_model_dir, target_shards, ref_shards,
                                                              cache_dir):
    """The cache's frozen forward ran in fp32; this run's would run under bf16 autocast: refused, not warned."""
    argv = [a if a != "fp32" else "amp_bf16" for a in ref_args("dive", ref_shards, "--ref-teacher-cache", cache_dir)]
    with pytest.raises(ValueError, match=r"its precision differs from this run's \(set by --precision, "
                                         r"--diff-precision\)(.|\n)*cache: fp32(.|\n)*run:   amp_bf16"):
        run_main(train_args(tmp_path, "stale", tiny_model_dir, target_shards, *argv, "--diff-precision", "autocast"))
    assert TeacherCache(cache_dir).manifest["provenance"]["precision"] == "fp32"


def test_kernel_teacher_cache_of_another_precision_is_refused():
    recorded = {"teacher": "t", "teacher_weights_sha256": "a", "teacher_image_size": [48, 48], "precision": "fp32"}
    with pytest.raises(ValueError, match=r"its precision differs from this run's \(set by --precision\)"):
        check_provenance(recorded, {**recorded, "precision": "amp_bf16"}, "DIR", "kernel-teacher")


def test_check_provenance_names_both_values():
    recorded = {"model_cfg": 1, "weights_sha256": "a", "preprocess": "P", "tokenizer": "SimpleTokenizer(16)"}
    check_provenance(recorded, dict(recorded), "DIR")  # equal: no error
    with pytest.raises(ValueError, match=r"tokenizer differs(.|\n)*cache: SimpleTokenizer\(16\)(.|\n)*run:   Hf"):
        check_provenance(recorded, {**recorded, "tokenizer": "HfTokenizer"}, "DIR")


def test_random_reference_preprocessing_is_refused(tiny_model_dir):
    _, train, val = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    assert_deterministic(val)
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        assert_deterministic(train)
    assert " at 0x" not in preprocess_fingerprint(val)  # stable across processes


def test_cache_flag_is_refused_where_no_frozen_model_runs(capsys, cache_dir, ref_shards):
    argv = ["--train-data", "x.tar", "--robust-loss", "replay", "--ref-data", ref_shards, "--ref-teacher-cache",
            cache_dir]
    with pytest.raises(SystemExit):
        parse_args(argv, PluginManager({"robust": RobustPlugin()}))
    assert "--ref-teacher-cache: --robust-loss replay runs no frozen model" in capsys.readouterr().err


def test_missing_cache_dir_is_refused_before_training(capsys, tmp_path, ref_shards):
    plugins = PluginManager({"robust": RobustPlugin()})
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x.tar", "--robust-loss", "dive", "--ref-data", ref_shards,
                    "--ref-teacher-cache", str(tmp_path / "none")], plugins)
    assert "no manifest.json there" in capsys.readouterr().err


def test_equal_keys_and_basenames_in_two_sources_get_their_own_files(tmp_path, tiny_model_dir):
    """Rows are looked up within a shard, so keys need only be unique within one (upstream's loader
    allows repeats across tars); two sources' 000000.tar get two files."""
    a = write_samples(str(tmp_path / "a"), photo_samples(4), 4)["shards"]
    b = write_samples(str(tmp_path / "b"), photo_samples(6)[2:], 4)["shards"]  # same keys 000000000.., other images
    manifest = build_cache(f"local-dir:{tiny_model_dir}", f"{a}::{b}", str(tmp_path / "cache"), workers=0)
    assert manifest["files"] == ["shards/00000-000000.tar.pt", "shards/00001-000000.tar.pt"]
    cache = TeacherCache(str(tmp_path / "cache"))
    rows_a, rows_b = (cache.lookup(u, ["000000002"])["image_features"] for u in manifest["shards"])
    torch.testing.assert_close(rows_a, cache.lookup(manifest["shards"][1], ["000000000"])["image_features"])
    assert not torch.allclose(rows_a, rows_b)  # photo 2 of a is photo 0 of b


@pytest.mark.slow
def test_torchrun_ranks_take_the_shards_round_robin(tmp_path, tiny_model_dir, ref_shards, cache_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), "-m", "openclip_robust", "cache-teacher", "--model",
           f"local-dir:{tiny_model_dir}", "--ref-data", ref_shards, "--out", str(tmp_path / "c2"), "--workers", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two, one = TeacherCache(str(tmp_path / "c2")), TeacherCache(cache_dir)
    assert two.manifest["files"] == one.manifest["files"] and two.manifest["counts"] == [16, 16, 16]
    for url in one.manifest["shards"]:  # shards 0 and 2 embedded by rank 0, shard 1 by rank 1
        keys = one.shard(url).keys
        assert two.shard(url).keys == keys
        for name in ("image_features", "text_features"):
            torch.testing.assert_close(two.lookup(url, keys)[name], one.lookup(url, keys)[name], rtol=1e-5, atol=1e-6)


# -- the per-shard layout --------------------------------------------------------------------------
def test_one_file_per_data_shard_holds_that_shards_keys_in_order(cache_dir):
    manifest = TeacherCache(cache_dir).manifest
    assert sorted(os.listdir(cache_dir)) == ["build.json", "manifest.json", "shards"]
    assert manifest["files"] == [f"shards/{i:05d}-{i:06d}.tar.pt" for i in range(3)]
    assert manifest["counts"] == [16, 16, 16] and manifest["dtype"] == "fp32" and manifest["format"] == 3
    for url, name in zip(manifest["shards"], manifest["files"]):
        with tarfile.open(url) as tar:
            want = [key for key, _ in tar_samples(tar)]
        stored = torch.load(os.path.join(cache_dir, name), weights_only=True)
        assert stored["keys"] == want
        assert stored["image_features"].shape == (16, manifest["dims"]["image_features"])
        assert stored["image_features"].dtype == torch.float32
        # each row's content digest: sha256 over key, image bytes and caption bytes, truncated to 16 bytes
        with tarfile.open(url) as tar:
            key, members = next(tar_samples(tar))
            raw = {ext: tar.extractfile(members[ext]).read() for ext in ("png", "txt")}
        h = hashlib.sha256(key.encode())
        for ext in ("png", "txt"):
            h.update(f"|{ext}:{len(raw[ext])}|".encode() + raw[ext])
        assert stored["digests"].dtype == torch.uint8 and stored["digests"].shape == (16, 16)
        assert stored["digests"][0].numpy().tobytes() == h.digest()[:16]
        assert manifest["data_digests"][int(key) // 16] == hashlib.sha256(stored["digests"].numpy().tobytes()).hexdigest()
        path = os.path.join(cache_dir, name)
        assert manifest["checksums"][manifest["files"].index(name)] == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_reference_stream_opens_only_its_shards_file_and_delivers_the_teachers_rows(cache_dir, tiny_model_dir,
                                                                                      monkeypatch):
    """A rank streaming shard 1 of 3 opens that shard's file once; each batch carries the frozen model's
    embeddings of its own samples."""
    opened, real = [], teacher_cache.ShardRows.__init__
    monkeypatch.setattr(teacher_cache.ShardRows, "__init__",
                        lambda self, path, *a: (opened.append(os.path.basename(path)), real(self, path, *a))[1])
    cache = TeacherCache(cache_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}", output_dict=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    args = SimpleNamespace(rank=0, seed=0, ref_batch_size=8, ref_workers=0, device="cpu", data_failure_limit=200)
    stream = ReferenceStream(args, [cache.manifest["shards"][1]], preprocess, tokenizer, teacher_cache=cache)
    for _ in range(3):
        batch = stream.next_batch()
        assert all(16 <= int(k) < 32 for k in batch.keys)  # shard 1's samples
        with torch.no_grad():
            want = model(batch.images, batch.texts)
        for name in ("image_features", "text_features"):
            torch.testing.assert_close(batch.frozen[name], want[name], rtol=1e-5, atol=1e-6)
    assert opened == ["00001-000001.tar.pt"]  # once, though the resampled stream read the shard many times


def test_fp16_cache_rows_equal_fp32_to_fp16_rounding(tmp_path, cache_dir, tiny_model_dir, ref_shards):
    out = str(tmp_path / "half")
    build_cache(f"local-dir:{tiny_model_dir}", ref_shards, out, batch_size=20, workers=0, dtype="fp16")
    half, full = TeacherCache(out), TeacherCache(cache_dir)
    assert half.manifest["dtype"] == "fp16" and 2 * half.nbytes() == full.nbytes()
    assert torch.load(os.path.join(out, half.manifest["files"][0]), weights_only=True)["text_features"].dtype \
        == torch.float16
    for url in full.manifest["shards"]:
        keys = full.shard(url).keys
        for name in ("image_features", "text_features"):
            got, want = half.lookup(url, keys)[name], full.lookup(url, keys)[name]
            assert got.dtype == torch.float32 and not torch.equal(got, want)  # rounded, read back as fp32
            torch.testing.assert_close(got, want, rtol=2 ** -11, atol=1e-7)


def test_interrupted_build_resumes_recomputing_only_the_missing_shards(tmp_path, cache_dir, tiny_model_dir,
                                                                        ref_shards, monkeypatch):
    out, model = str(tmp_path / "resumed"), f"local-dir:{tiny_model_dir}"
    real_save, real_loader, saved, embedded = teacher_cache._save_atomic, teacher_cache._shard_loader, [], []

    def save_then_die(obj, path):  # killed while writing the second shard's file
        if saved:
            open(path + ".tmp", "wb").write(b"PK\x03\x04 half written")
            raise KeyboardInterrupt
        saved.append(path)
        real_save(obj, path)
    with monkeypatch.context() as m:
        m.setattr(teacher_cache, "_save_atomic", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            build_cache(model, ref_shards, out, batch_size=20, workers=0)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000-000000.tar.pt", "00001-000001.tar.pt.tmp"]
    with pytest.raises(ValueError, match="no manifest.json there .*run the same cache-teacher command again"):
        TeacherCache(out)
    with pytest.raises(ValueError, match="holds an unfinished build with another dtype"):
        build_cache(model, ref_shards, out, batch_size=20, workers=0, dtype="fp16")

    monkeypatch.setattr(teacher_cache, "_shard_loader",
                        lambda urls, *a, **k: (embedded.extend(urls), real_loader(urls, *a, **k))[1])
    manifest = build_cache(model, ref_shards, out, batch_size=20, workers=0)
    assert [os.path.basename(u) for u in embedded] == ["000001.tar", "000002.tar"]
    full = TeacherCache(cache_dir)
    assert manifest == full.manifest
    assert sorted("shards/" + f for f in os.listdir(os.path.join(out, "shards"))) == full.manifest["files"]
    resumed = TeacherCache(out)
    for url in full.manifest["shards"]:
        keys = full.shard(url).keys
        for name in ("image_features", "text_features"):
            torch.testing.assert_close(resumed.lookup(url, keys)[name], full.lookup(url, keys)[name], rtol=1e-5,
                                       atol=1e-6)
