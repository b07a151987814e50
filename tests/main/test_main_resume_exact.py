"""Resume exact on upstream's main line (training tasks): 2 epochs x 4 steps with a random crop, straight vs
1 epoch + --resume, bit-identical weights (the generators' states restored when the resumed epoch starts)."""
import pytest
import torch

from tests.main.test_main_line import run, train_args

pytestmark = pytest.mark.slow


def test_main_line_resume_equals_the_straight_run(tmp_path, tiny_model_dir, target_shards):
    def args(name, *extra):
        return train_args(tmp_path / "logs", name, tiny_model_dir, target_shards, "--robust-loss", "flyp",
                          "--precision", "fp32", "--aug-cfg", "scale=(0.5,1.0)", "--workers", "0", *extra, epochs=2,
                          batch=16, samples=64)
    straight = run(tmp_path, "straight", args("straight"))
    first = straight.dir / "checkpoints" / "epoch_1.pt"
    resumed = run(tmp_path, "resumed", args("resumed", "--resume", str(first)))
    a, b, start = straight.ckpt(2)["state_dict"], resumed.ckpt(2)["state_dict"], straight.ckpt(1)["state_dict"]
    assert sum(not torch.equal(a[k], start[k]) for k in a) > 10  # epoch 2 trained
    for k in a:
        assert torch.equal(b[k], a[k]), k
