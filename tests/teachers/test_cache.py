"""The teacher cache: cached frozen embeddings give the same training losses; a stale cache is refused."""
import os
import subprocess
import sys

import open_clip
import pytest
import torch

from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager

from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import photo_samples, tiny_model
from openclip_robust.plugin import RobustPlugin
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
    got = cache.lookup([sample["__key__"]], "cpu")
    for name in ("image_features", "text_features"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="sample key 'nope' is not cached"):
        cache.lookup(["nope"], "cpu")


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


def test_duplicate_keys_are_refused(tmp_path, tiny_model_dir):
    a = write_samples(str(tmp_path / "a"), photo_samples(4), 4)["shards"]
    b = write_samples(str(tmp_path / "b"), photo_samples(4), 4)["shards"]  # same keys 000000000..
    with pytest.raises(ValueError, match="occurs more than once"):
        build_cache(f"local-dir:{tiny_model_dir}", f"{a}::{b}", str(tmp_path / "cache"), workers=0)


@pytest.mark.slow
def test_torchrun_build_writes_one_part_per_rank(tmp_path, tiny_model_dir, ref_shards, cache_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), "-m", "openclip_robust", "cache-teacher", "--model",
           f"local-dir:{tiny_model_dir}", "--ref-data", ref_shards, "--out", str(tmp_path / "c2"), "--workers", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two, one = TeacherCache(str(tmp_path / "c2")), TeacherCache(cache_dir)
    assert two.manifest["parts"] == ["part-00000.pt", "part-00001.pt"]
    assert all(len(p["keys"]) > 0 for p in two.parts)  # 3 shards split over 2 ranks
    keys = sorted(one.index)
    assert sorted(two.index) == keys
    for name in ("image_features", "text_features"):
        torch.testing.assert_close(two.lookup(keys, "cpu")[name], one.lookup(keys, "cpu")[name], rtol=1e-5, atol=1e-6)
