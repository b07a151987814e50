"""Resume is exact where it can be: the generators that shape training are saved with the plugin's state and
restored, so 1 epoch + --resume gives the straight run's weights bit for bit over several steps per epoch with
a random train augmentation (docs/checkpoints-distributed.md says where it cannot be: loader workers that
persist across epochs keep their own generators, which a checkpoint does not hold)."""
import random

import numpy as np
import pytest
import torch

from openclip_robust import rng_state
from tests.test_training_e2e import load_ckpt, run_main, train_args

pytestmark = pytest.mark.slow


def test_saved_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save({"rng": rng_state.capture()}, tmp_path / "c.pt")
    want = (torch.rand(4), random.random(), np.random.rand(3))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    rng_state.restore(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


def run(tmp_path, name, tiny_model_dir, target_shards, *extra):
    # 64 samples in batches of 16: 4 steps per epoch; RandomResizedCrop over scale 0.5-1: a random augmentation,
    # drawn from torch's generator in the loading process (--workers 0)
    argv = train_args(tmp_path, name, tiny_model_dir, target_shards, "--robust-loss", "flyp", "--precision", "fp32",
                      "--aug-cfg", "scale=(0.5,1.0)", "--workers", "0", *extra, epochs=2, batch=16, samples=64)
    assert run_main(argv) is None


def test_one_epoch_then_resume_equals_two_epochs_straight(tmp_path, tiny_model_dir, target_shards):
    run(tmp_path, "straight", tiny_model_dir, target_shards)
    first = tmp_path / "logs" / "straight" / "checkpoints" / "epoch_1.pt"
    run(tmp_path, "resumed", tiny_model_dir, target_shards, "--resume", str(first))
    straight, resumed = load_ckpt(tmp_path, "straight", 2), load_ckpt(tmp_path, "resumed", 2)
    start = torch.load(first, weights_only=True)["state_dict"]
    moved = [k for k in straight["state_dict"] if not torch.equal(straight["state_dict"][k], start[k])]
    assert len(moved) > 10  # epoch 2 trained: the comparison is not vacuous
    for k, v in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k  # bit for bit
    assert {"torch", "python", "numpy"} <= set(torch.load(first, weights_only=True)["plugins"]["robust"]["rng"])
