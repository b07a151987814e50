"""Patch 0006: upstream's checkpoint saves go through a temporary file + os.replace; a full disk is an error
that says so and names the checkpoint, and leaves no partial file."""
import errno
import io
import os
import re
import subprocess
import sys

import pytest
import torch

from open_clip_train import file_utils

from tests.test_training_e2e import train_args

TIMEOUT = 600  # seconds: a hang fails the test


class FullDiskFile(io.FileIO):
    """A real file on which every write past `room` bytes fails as on a full file system (ENOSPC)."""
    room = 4096

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def test_a_save_writes_the_whole_checkpoint_and_nothing_else(tmp_path):
    path = tmp_path / "epoch_1.pt"
    file_utils.save_checkpoint_atomic({"w": torch.arange(1000.0)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000.0))
    assert os.listdir(tmp_path) == ["epoch_1.pt"]


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "epoch_latest.pt"
    file_utils.save_checkpoint_atomic({"epoch": 1}, str(path))
    before = path.read_bytes()
    monkeypatch.setattr(file_utils, "open", lambda p, mode: FullDiskFile(p, "w"), raising=False)
    with pytest.raises(OSError) as e:
        file_utils.save_checkpoint_atomic({"epoch": 2, "w": torch.zeros(100_000)}, str(path))
    assert e.value.errno == errno.ENOSPC
    assert f"could not save checkpoint {path}: no space left on device" in str(e.value)
    assert os.listdir(tmp_path) == ["epoch_latest.pt"]  # the temporary file was removed
    assert path.read_bytes() == before  # the last complete checkpoint is intact


def test_other_failures_pass_through_and_leave_nothing(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(TypeError, match="cannot pickle this"):
        file_utils.save_checkpoint_atomic({"x": Unpicklable()}, str(tmp_path / "epoch_1.pt"))
    assert os.listdir(tmp_path) == []


# the file-size limit makes the kernel fail writes past it (EFBIG) as a full disk fails them (ENOSPC);
# SIGXFSZ is ignored so the write returns the error instead of killing the process
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from open_clip_train.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_upstream_main_on_a_full_disk_fails_naming_the_checkpoint(tmp_path, tiny_model_dir, target_shards):
    """A real run of upstream's main (no plugin) whose checkpoint (~38 MB) outgrows a 1 MiB file-size limit:
    exit status non-zero, the last line names epoch_1.pt and the lack of space, no partial file remains."""
    argv = train_args(tmp_path, "full", tiny_model_dir, target_shards, "--device", "cpu")
    out = subprocess.run([sys.executable, "-c", LIMITED, *argv], capture_output=True, text=True, timeout=TIMEOUT)
    checkpoints = tmp_path / "logs" / "full" / "checkpoints"
    assert out.returncode != 0
    # the traceback's last line (torch's exit-time INFO lines, "I1205 ...", may follow it)
    last = [line for line in out.stderr.splitlines() if not re.match(r"[IWD]\d{4} ", line)][-1]
    assert last == (f"OSError: [Errno {errno.EFBIG}] could not save checkpoint {checkpoints / 'epoch_1.pt'}: no space "
                    f"left on device (file-size limit reached); nothing was written there"), out.stderr[-3000:]
    assert "Contrastive_loss" in (tmp_path / "logs" / "full" / "out.log").read_text()  # it trained, then failed
    assert os.listdir(checkpoints) == []
