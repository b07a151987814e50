"""--resume continues only the run that wrote the checkpoint; a random frozen model is refused;
--resume latest passes over a truncated newest checkpoint."""
import shutil

import pytest
import torch

from tests.test_guards import run_training
from tests.test_training_e2e import train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dive_checkpoint(tmp_path_factory, tiny_model_dir, target_shards, ref_shards):
    tmp = tmp_path_factory.mktemp("dive_ckpt")
    argv = train_args(tmp, "dive", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data", ref_shards,
                      "--ref-batch-size", "8", "--dive-lambda", "10", epochs=2)
    code, log = run_training(tmp, "dive", *argv)
    assert code == 0, log[-3000:]
    return tmp / "logs" / "dive" / "checkpoints"


def resume_with(tmp_path, model_dir, target, ckpt, *method):
    argv = train_args(tmp_path, "resumed", model_dir, target, *method, "--resume", str(ckpt), epochs=3)
    return run_training(tmp_path, "resumed", *argv, timeout=240)


def test_checkpoint_records_the_run(dive_checkpoint):
    record = torch.load(dive_checkpoint / "epoch_1.pt", weights_only=True)["plugins"]["robust"]["run"]
    assert record["method"] == "dive" and record["embed_dim"] == 32 and len(record["frozen_weights"]) == 16
    assert record["settings"] == {"dive_distance": "vector", "dive_terms": "avl,pvl", "dive_alpha": 0.99}


@pytest.mark.parametrize("method,message", [
    (["--robust-loss", "flyp"], "the checkpoint was trained with --robust-loss dive, this run asks for "
                                "--robust-loss flyp. To continue"),
    (["--robust-loss", "snd", "REF"], "the checkpoint was trained with --robust-loss dive, this run asks for "
                                      "--robust-loss snd"),
    (["--robust-loss", "dive", "REF", "--dive-distance", "cosine"],
     "settings that shape the loss state differ: --dive-distance 'vector' in the checkpoint, 'cosine' now"),
])
def test_resume_with_another_method_or_settings_is_refused(tmp_path, tiny_model_dir, target_shards, ref_shards,
                                                           dive_checkpoint, method, message):
    method = [a for m in method for a in (["--ref-data", ref_shards, "--ref-batch-size", "8"] if m == "REF" else [m])]
    code, log = resume_with(tmp_path, tiny_model_dir, target_shards, dive_checkpoint / "epoch_1.pt", *method)
    assert code != 0 and f"ResumeError: --resume {dive_checkpoint / 'epoch_1.pt'}: {message}" in log
    assert "Unexpected key(s) in state_dict" not in log and "drop --resume (and give a new --name)" in log


def test_frozen_model_without_pretrained_weights_is_refused(tmp_path, tiny_model_dir, target_shards, ref_shards,
                                                            dive_checkpoint):
    """The model folder without its weights: upstream initialises randomly; DiVE would pull towards noise."""
    bare = tmp_path / "bare_model"
    bare.mkdir()
    shutil.copy(f"{tiny_model_dir}/open_clip_config.json", bare)
    code, log = resume_with(tmp_path, bare, target_shards, dive_checkpoint / "epoch_1.pt", "--robust-loss", "dive",
                            "--ref-data", ref_shards, "--ref-batch-size", "8")
    assert code != 0 and "ResumeError: --robust-loss dive regularises towards the frozen pre-trained model, but " \
                          "upstream loaded no pre-trained weights" in log


def test_frozen_model_other_than_the_checkpoints_is_refused(tmp_path, tiny_model_dir, target_shards, ref_shards,
                                                            dive_checkpoint):
    """Other pre-trained weights (here: the checkpoint's own, as if --pretrained pointed at it)."""
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    weights = next(p for p in other.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
    state = torch.load(dive_checkpoint / "epoch_1.pt", weights_only=True)["state_dict"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    code, log = resume_with(tmp_path, other, target_shards, dive_checkpoint / "epoch_1.pt", "--robust-loss", "dive",
                            "--ref-data", ref_shards, "--ref-batch-size", "8")
    assert code != 0 and "the frozen model is not the one the checkpoint was trained against" in log


def test_resume_latest_falls_back_past_a_truncated_checkpoint(tmp_path, tiny_model_dir, target_shards, ref_shards,
                                                              dive_checkpoint):
    run = tmp_path / "logs" / "dive"
    shutil.copytree(dive_checkpoint.parent, run)
    newest = run / "checkpoints" / "epoch_2.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated
    (run / "out.log").write_text("")
    argv = train_args(tmp_path, "dive", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "8", "--dive-lambda", "10", "--resume", "latest", epochs=3)
    code, log = run_training(tmp_path, "dive", *argv, timeout=240)
    assert code == 0, log[-3000:]
    assert f"--resume latest: {newest} does not load (truncated or corrupt: " in log
    assert f"moved to {newest}.corrupt; resuming from {run / 'checkpoints' / 'epoch_1.pt'}" in log
    assert "resuming checkpoint" in log and "(epoch 1)" in log
    assert (run / "checkpoints" / "epoch_2.pt.corrupt").exists()
    assert torch.load(run / "checkpoints" / "epoch_3.pt", weights_only=True)["epoch"] == 3


def test_plain_upstream_checkpoint_resumed_with_a_robust_loss(tmp_path, tiny_model_dir, target_shards, ref_shards):
    code, log = run_training(tmp_path, "plain", *train_args(tmp_path, "plain", tiny_model_dir, target_shards))
    assert code == 0, log[-3000:]
    ckpt = tmp_path / "logs" / "plain" / "checkpoints" / "epoch_1.pt"
    code, log = resume_with(tmp_path, tiny_model_dir, target_shards, ckpt, "--robust-loss", "dive", "--ref-data",
                            ref_shards, "--ref-batch-size", "8")
    assert code != 0 and f"ResumeError: --resume {ckpt}: the checkpoint was trained without --robust-loss, this run " \
                          f"asks for --robust-loss dive" in log
