"""Bad input gets a clear error naming the flag or file, before training starts."""
import importlib.util
import io
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager

from openclip_robust.teachers.frozen import check_upstream_bn_freeze, freeze_bn_stats
from openclip_robust.plugin import RobustPlugin
from openclip_robust.data.reference import readable_shards

ROOT = Path(__file__).resolve().parent.parent


def parse(argv):
    return parse_args(["--train-data", "x.tar", *argv], PluginManager({"robust": RobustPlugin()}))


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_help_lists_the_plugin_group(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    choices = re.search(r"--robust-loss \{([a-z0-9,]+)\}", out).group(1).split(",")
    assert "openclip-robust:" in out and {"dive", "flyp", "replay", "snd", "kernel"} <= set(choices)
    assert "--dive-lambda" in out and "--ref-data" in out


def test_unknown_robust_loss_lists_choices(capsys):
    err = cli_error(["--robust-loss", "nope"], capsys)
    assert "--robust-loss: invalid choice: 'nope'" in err and "dive" in err


def test_reference_flags_without_robust_loss(capsys, ref_shards):
    err = cli_error(["--ref-data", ref_shards, "--dive-lambda", "5"], capsys)
    assert "--ref-data, --dive-lambda given without --robust-loss" in err


@pytest.mark.parametrize("method", ["dive", "replay", "snd"])
def test_missing_ref_data(capsys, method):
    assert f"--robust-loss {method} needs --ref-data" in cli_error(["--robust-loss", method], capsys)


def test_ref_data_with_no_readable_shard(capsys, tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    err = cli_error(["--robust-loss", "dive", "--ref-data", f"{tmp_path}/{{missing,empty}}.tar"], capsys)
    assert "--ref-data" in err and "no readable shard (2 listed)" in err


def test_unreadable_shard_among_readable_is_skipped_with_warning(tmp_path, ref_shards, caplog):
    """A source with a good and a corrupt shard: the corrupt one is skipped (a source with none readable is
    an error: tests/security/test_storage_and_errors.py)."""
    bad = tmp_path / "corrupt.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    good, _ = readable_shards(ref_shards)
    shutil.copy(good[0], tmp_path / "good.tar")
    with caplog.at_level(logging.WARNING):
        kept, _ = readable_shards(f"{ref_shards}::{tmp_path}/{{good,corrupt}}.tar")
    assert kept == good + [str(tmp_path / "good.tar")] and len(good) == 3
    assert f"--ref-data: skipping shard {bad} (unreadable or without image+txt samples)" in caplog.text


def test_image_only_reference_shard_is_refused(capsys, tmp_path):
    shard = tmp_path / "images.tar"
    with tarfile.open(shard, "w") as tar:
        data = b"\x89PNG fake"
        info = tarfile.TarInfo("0001.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert "no readable shard" in cli_error(["--robust-loss", "snd", "--ref-data", str(shard)], capsys)


def test_bad_dive_alpha(capsys, ref_shards):
    assert "--dive-alpha 1.0: must be in [0, 1)" in cli_error(
        ["--robust-loss", "dive", "--ref-data", ref_shards, "--dive-alpha", "1.0"], capsys)


def test_defaults_and_ref_batch_size(ref_shards):
    args = parse(["--robust-loss", "dive", "--ref-data", ref_shards, "--batch-size", "7"])
    assert args.ref_batch_size == 7 and args.dive_lambda == 1000.0 and args.dive_alpha == 0.99
    assert parse([]).robust_loss is None


def test_reference_workers_default_scales_with_the_reference_batch(ref_shards):
    flags = ["--robust-loss", "dive", "--ref-data", ref_shards, "--workers", "4", "--batch-size", "8"]
    assert parse(flags + ["--ref-batch-size", "16"]).ref_workers == 8  # twice the images a step
    assert parse(flags + ["--ref-batch-size", "2"]).ref_workers == 1
    assert parse(flags + ["--ref-batch-size", "1"]).ref_workers == 1  # at least one
    assert parse(flags + ["--ref-workers", "3"]).ref_workers == 3


def test_bn_statistics_stay_frozen_while_affine_trains():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    assert freeze_bn_stats(model) == 1
    before = model[1].running_mean.clone()
    model(torch.randn(8, 3, 5, 5) * 3 + 1).sum().backward()
    assert torch.equal(model[1].running_mean, before)
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    assert model[0].training  # only BatchNorm leaves train mode


def test_upstream_bn_freeze_refused_on_fused_batchnorm_act():
    from open_clip.utils import freeze_batch_norm_2d
    from timm.layers import BatchNormAct2d
    fused = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU6)).eval()
    x = torch.randn(2, 3, 5, 5) * 3
    expected = fused(x)
    assert expected.min() >= 0  # ReLU6 inside the BatchNorm
    # why it is refused: upstream's freeze swaps the fused layer for a plain one and loses the activation
    broken = freeze_batch_norm_2d(nn.Sequential(*[m for m in fused])).eval()
    assert broken(x).min() < 0
    args = parse(["--robust-loss", "flyp", "--lock-image-freeze-bn-stats"])
    with pytest.raises(ValueError, match=r"--lock-image-freeze-bn-stats: .*BatchNormAct2d.*--robust-bn frozen"):
        check_upstream_bn_freeze(args, fused)
    check_upstream_bn_freeze(args, nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))  # plain BN: fine
    check_upstream_bn_freeze(parse(["--robust-loss", "flyp"]), fused)  # flag not given: fine


# -- set-up ---------------------------------------------------------------------------------------
def load_installer():
    spec = importlib.util.spec_from_file_location("install", ROOT / "scripts" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_sdist(path, version):
    pkg = f"open_clip_torch-{version}"
    with tarfile.open(path, "w:gz") as tar:
        data = f"Metadata-Version: 2.1\nName: open_clip_torch\nVersion: {version}\n".encode()
        info = tarfile.TarInfo(f"{pkg}/PKG-INFO")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_setup_refuses_a_non_pinned_upstream(tmp_path, capsys):
    install = load_installer()
    pin = install.read_pin()
    assert pin["version"] == "3.3.0" and len(pin["sha256"]) == 64
    other = fake_sdist(tmp_path / "open_clip_torch-3.2.0.tar.gz", "3.2.0")
    with pytest.raises(install.SetupError, match="is open-clip-torch 3.2.0, but upstream_pin.txt pins 3.3.0"):
        install.verify_sdist(other, pin)
    tampered = fake_sdist(tmp_path / "open_clip_torch-3.3.0.tar.gz", "3.3.0")
    with pytest.raises(install.SetupError, match="sha256 mismatch for .*upstream_pin.txt expects 904b1a9f"):
        install.verify_sdist(tampered, pin)
    assert install.main(["--sdist", str(other), "--python", "/nonexistent/python"]) == 2
    assert "set-up error:" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"random bytes" * 300, "truncated"])
def test_setup_names_an_unreadable_sdist(tmp_path, capsys, content):
    install = load_installer()
    sdist = tmp_path / "open_clip_torch-3.3.0.tar.gz"
    if content == "truncated":
        whole = fake_sdist(tmp_path / "whole.tar.gz", "3.3.0").read_bytes()
        sdist.write_bytes(whole[: len(whole) // 2])
    elif content is not None:
        sdist.write_bytes(content)
    assert install.main(["--sdist", str(sdist), "--python", "/nonexistent/python"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"set-up error: {sdist}: ") and len(err.splitlines()) == 1
    assert ("no such file" if content is None else "not a readable .tar.gz") in err


@pytest.mark.parametrize("extra, named", [(["--robust-loss", "replay"], "not replay"),
                                          (["--robust-loss", "dive", "--accum-freq", "2"], "not 2")])
def test_separate_reference_backward_only_where_it_is_exact(capsys, ref_shards, extra, named):
    err = cli_error([*extra, "--ref-data", ref_shards, "--ref-backward", "separate"], capsys)
    assert "--ref-backward separate: needs a method whose reference terms are separable" in err and named in err
