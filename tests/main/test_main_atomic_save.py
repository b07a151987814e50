"""Patch 0006 on upstream's main line: a checkpoint that outgrows the disk (here: a 1 MiB file-size limit, the
kernel's EFBIG as a full disk's ENOSPC) is an error naming it; no partial epoch_1.pt remains."""
import errno
import os
import re
import subprocess

import pytest

from tests.main.test_main_line import PYTHON, TIMEOUT, train_args
from tests.test_atomic_checkpoint import LIMITED

pytestmark = pytest.mark.slow


def test_main_line_on_a_full_disk_fails_naming_the_checkpoint(tmp_path, tiny_model_dir, target_shards):
    argv = train_args(tmp_path / "logs", "full", tiny_model_dir, target_shards)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(PYTHON), "-c", LIMITED, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                         env=env, cwd=tmp_path)
    checkpoints = tmp_path / "logs" / "full" / "checkpoints"
    assert out.returncode != 0
    last = [line for line in out.stderr.splitlines() if not re.match(r"[IWD]\d{4} ", line)][-1]
    assert last == (f"OSError: [Errno {errno.EFBIG}] could not save checkpoint {checkpoints / 'epoch_1.pt'}: no space "
                    f"left on device (file-size limit reached); nothing was written there"), out.stderr[-3000:]
    assert os.listdir(checkpoints) == []
