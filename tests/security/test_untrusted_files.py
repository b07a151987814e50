"""A checkpoint a run is pointed at never runs code: --resume latest and --resume PATH refuse a file whose
pickle imports something, without unpickling it; damaged ones are named (latest: moved aside; PATH: error)."""
import argparse
import os
import pickle
import zipfile

import pytest
import torch

from openclip_robust import resume


class Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path, marker, kind):
    if kind == "raw-pickle":       # not a zip: what the old `loads` unpickled with weights_only=False
        path.write_bytes(pickle.dumps({"epoch": 9, "state_dict": Payload(marker)}))
    elif kind == "torch-legacy":
        torch.save({"epoch": 9, "x": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    else:                          # torch's zip format with the payload in data.pkl
        torch.save({"epoch": 9, "x": Payload(marker)}, path)
    return path


def args_for(tmp_path, resume_value):
    return argparse.Namespace(resume=resume_value, name="run", logs=str(tmp_path / "logs"), remote_sync=None,
                              save_most_recent=False)


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-legacy", "zip"])
def test_resume_latest_refuses_a_crafted_newest_checkpoint_without_running_it(tmp_path, kind):
    ckpts = tmp_path / "logs" / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, ckpts / "epoch_1.pt")
    marker = tmp_path / "pwned"
    bad = crafted(ckpts / "epoch_9.pt", marker, kind)
    with pytest.raises(resume.ResumeError) as e:
        resume.fall_back_past_corrupt_latest(args_for(tmp_path, "latest"))
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and "not a weights-only checkpoint" in message
    assert not marker.exists()          # nothing ran
    assert bad.exists()                 # and nothing was renamed: it is not damage, someone put it there


@pytest.mark.parametrize("kind", ["raw-pickle", "zip"])
def test_resume_path_refuses_a_crafted_checkpoint_without_running_it(tmp_path, kind):
    marker = tmp_path / "pwned"
    bad = crafted(tmp_path / "epoch_9.pt", marker, kind)
    with pytest.raises(resume.ResumeError, match="refusing to load it") as e:
        resume.check_resume_path(args_for(tmp_path, str(bad)))
    assert str(bad) in str(e.value) and not marker.exists()


def test_resume_path_gets_the_crc_check_of_resume_latest(tmp_path):
    good = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.arange(4096.0)}}, good)
    resume.check_resume_path(args_for(tmp_path, str(good)))  # whole: no error
    # flip one byte inside the tensor data member: the archive still opens, only its CRC tells
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = bytearray(good.read_bytes())
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    raw[offset] ^= 0xFF
    rotted = tmp_path / "epoch_2.pt"
    rotted.write_bytes(bytes(raw))
    with pytest.raises(resume.ResumeError, match="fails its CRC check") as e:
        resume.check_resume_path(args_for(tmp_path, str(rotted)))
    assert str(rotted) in str(e.value)
    truncated = tmp_path / "epoch_3.pt"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(resume.ResumeError, match="truncated or corrupt"):
        resume.check_resume_path(args_for(tmp_path, str(truncated)))


def test_resume_latest_still_moves_a_truncated_newest_aside(tmp_path):
    ckpts = tmp_path / "logs" / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, ckpts / "epoch_1.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(2000)}}, ckpts / "epoch_2.pt")
    (ckpts / "epoch_2.pt").write_bytes((ckpts / "epoch_2.pt").read_bytes()[:2000])
    resume.fall_back_past_corrupt_latest(args_for(tmp_path, "latest"))
    assert (ckpts / "epoch_2.pt.corrupt").exists() and (ckpts / "epoch_1.pt").exists()
    assert not (ckpts / "epoch_2.pt").exists()


@pytest.mark.parametrize("kind", ["torch-legacy", "zip"])
def test_a_crafted_prompt_module_or_teacher_weights_file_is_refused_without_running(tmp_path, kind):
    import timm

    from openclip_robust.prompts import PromptModule
    from openclip_robust.teachers.vision import load_teacher_weights
    from openclip_robust.untrusted import UntrustedFileError
    marker = tmp_path / "pwned"
    bad = crafted(tmp_path / "file.pt", marker, kind)
    with pytest.raises(UntrustedFileError, match="not a weights-only file") as e:
        PromptModule.load(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with pytest.raises(UntrustedFileError, match=f"--kernel-teacher-pretrained {bad}: not a weights-only file"):
        load_teacher_weights(model, "test_vit", str(bad))
    assert not marker.exists()
