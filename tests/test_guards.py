"""The NaN guard: a non-finite loss stops the run naming the step and term; bounded skipping."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from openclip_robust.guards import NonFiniteGuard, NonFiniteLossError
from tests.test_training_e2e import train_args


class TwoTerms(nn.Module):
    def forward(self, x, bad=None, output_dict=True):
        terms = {"contrastive_loss": x.sum(), "dive_avl": x.sum() * 2}
        if bad:
            terms[bad] = terms[bad] * float("inf")
        return terms


def guarded(skip_limit=0, accum_freq=1):
    model, loss = nn.Linear(3, 1), TwoTerms()
    guard = NonFiniteGuard(SimpleNamespace(nonfinite_skip_limit=skip_limit, accum_freq=accum_freq), model, loss)
    loader = SimpleNamespace(num_batches=4 * accum_freq)
    guard.on_train_epoch_start(1, {"train": SimpleNamespace(dataloader=loader)})
    return model, loss, guard


def step(model, loss, bad=None):
    losses = loss(model(torch.ones(2, 3)), bad=bad)
    sum(losses.values()).backward()
    return losses


def test_non_finite_term_is_named_with_the_step():
    model, loss, guard = guarded()
    step(model, loss)
    guard.on_optimizer_step(4)  # epoch 1 starts at step 4
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 \(epoch 1, batch 2 of 4\): dive_avl "
                                                 r"\(this rank: contrastive_loss=[-0-9.]+, dive_avl=-?inf\)"):
        step(model, loss, bad="dive_avl")


def test_bounded_skipping_zeroes_the_steps_gradients(caplog):
    model, loss, guard = guarded(skip_limit=1, accum_freq=2)
    step(model, loss)  # first micro-batch: finite, its gradient is accumulated
    assert model.weight.grad.abs().sum() > 0
    step(model, loss, bad="contrastive_loss")  # second micro-batch: non-finite: the whole step is skipped
    assert torch.equal(model.weight.grad, torch.zeros_like(model.weight))
    assert "step skipped (1 of at most 1)" in caplog.text
    guard.on_optimizer_step(4)
    model.zero_grad()
    step(model, loss)  # the next step trains again
    assert model.weight.grad.abs().sum() > 0
    with pytest.raises(NonFiniteLossError, match="1 earlier step.s. were skipped, --nonfinite-skip-limit 1"):
        step(model, loss, bad="dive_avl")


def test_non_finite_weights_stop_before_the_checkpoint():
    model, loss, guard = guarded()
    guard.on_optimizer_step(5)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    guard.on_optimizer_step(6)  # not the epoch's last step: not checked (once per epoch)
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after step 7 \(epoch 1\): bias"):
        guard.on_optimizer_step(7)


def run_training(tmp_path, name, *argv, timeout=300):
    """upstream's main in a child process, bounded: a hang fails the test."""
    cmd = [sys.executable, "-m", "open_clip_train.main", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_nan_run_stops_without_a_checkpoint(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """λ = 1e300 is finite as a flag but overflows fp32: the first step's DiVE terms are inf."""
    argv = train_args(tmp_path, "nan", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "8", "--dive-lambda", "1e300", "--precision", "fp32")
    code, log = run_training(tmp_path, "nan", *argv)
    assert code != 0
    assert "NonFiniteLossError: openclip-robust: non-finite loss at step 0 (epoch 0, batch 1 of 2): dive_avl" in log
    assert not list((tmp_path / "logs" / "nan" / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_nan_steps_skipped_up_to_the_limit(tmp_path, tiny_model_dir, target_shards, ref_shards):
    argv = train_args(tmp_path, "skip", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "8", "--dive-lambda", "1e300", "--precision", "fp32",
                      "--nonfinite-skip-limit", "2", epochs=2)
    code, log = run_training(tmp_path, "skip", *argv)
    assert code != 0
    assert "step skipped (1 of at most 2)" in log and "step skipped (2 of at most 2)" in log
    assert "non-finite loss at step 2 (epoch 1, batch 1 of 2)" in log and "2 earlier step(s) were skipped" in log
    ckpt = torch.load(tmp_path / "logs" / "skip" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # skipped steps trained nothing bad


@pytest.mark.slow
def test_nan_under_torchrun_stops_both_ranks(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """torchrun, 2 processes, gloo on CPU: the decision is all-reduced, so both ranks raise at the same step."""
    import os
    argv = train_args(tmp_path, "ddp", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "4", "--batch-size", "8", "--dive-lambda", "1e300",
                      "--precision", "fp32")
    argv[argv.index("--logs")] = "--logs-dir"  # torchrun reads --logs as its own --logs-specs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + os.getpid() % 90), "-m", "open_clip_train.main", *argv]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert log.count("NonFiniteLossError: openclip-robust: non-finite loss at step 0 (epoch 0, batch 1 of 2)") >= 2, \
        log[-4000:]
