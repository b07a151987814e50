"""Retention metrics (evaluation/retention.py) and their run-time side (retention.py) on a toy CLIP whose
embeddings are known, so the values can be computed by hand."""
import io
import json
import math
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from openclip_robust import retention
from openclip_robust.data.shards import write_samples
from openclip_robust.evaluation import retention as metrics

# three images whose (red, green) means are the points (1, 0), (0, 1), (1, 1)
POINTS = [(255, 0), (0, 255), (255, 255)]


def png(red, green):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (red, green, 0)).save(buf, format="PNG")
    return buf.getvalue()


def preprocess(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def tokenizer(texts):
    return torch.tensor([[ord(t[-1])] for t in texts])  # the caption's last character picks its embedding


class ToyCLIP(torch.nn.Module):
    """image -> proj(mean red, mean green); text -> a table row. Features L2-normalised, as open_clip's."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)
        self.proj.weight.data = torch.eye(2)
        self.table = torch.nn.Embedding(128, 2)
        torch.manual_seed(0)
        self.table.weight.data = torch.randn(128, 2)
        self.table.weight.data[ord("x")], self.table.weight.data[ord("y")] = torch.tensor([1.0, 0]), torch.tensor([0, 1.0])

    def forward(self, image=None, text=None):
        f = F.normalize(self.proj(image.mean((2, 3))[:, :2]), dim=-1) if image is not None else None
        g = F.normalize(self.table(text[:, 0]), dim=-1) if text is not None else None
        return {"image_features": f, "text_features": g, "logit_scale": torch.tensor(1.0)}


@pytest.fixture
def pairs(tmp_path):
    samples = [{"png": png(*p), "txt": f"sample {c}"} for p, c in zip(POINTS, "abc")]
    return write_samples(str(tmp_path / "pairs"), samples, 2)["shards"]


@pytest.fixture
def suite(tmp_path):
    """Two classes 'x', 'y': red images are class 0, green ones class 1."""
    samples = [{"png": png(*p), "cls": str(c)} for p, c in [((255, 0), 0), ((0, 255), 1), ((200, 0), 0)]]
    shards = write_samples(str(tmp_path / "zs"), samples, 8)["shards"]
    (tmp_path / "classes.txt").write_text("x\ny\n")
    (tmp_path / "templates.txt").write_text("{c}\n")
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"datasets": [{"name": "toy", "role": "zeroshot", "path": shards,
                                              "classnames": "classes.txt", "templates": "templates.txt"}]}))
    return str(path)


def make_args(**kw):
    args = dict(retention_data=None, retention_samples=1000, retention_suite=None, retention_frequency=1,
                model="toy", pretrained=None, batch_size=2, device="cpu", rank=0, resume=None, epochs=3,
                accum_freq=1)
    return Namespace(**{**args, **kw})


def monitor(args):
    m = retention.RetentionMonitor()
    m.validate_args(args)
    m.setup(args, preprocess, tokenizer)
    return m


def test_a_model_that_did_not_move_keeps_everything():
    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    out = metrics.pair_metrics((img, txt), (img.clone(), txt.clone()))
    assert out["rsa_image"] == pytest.approx(1) and out["rsa_text"] == pytest.approx(1)
    assert out["rsa_joint"] == pytest.approx(1)
    assert out["u_norm"] == 0 and out["v_norm"] == 0
    assert all(out[k] == out[f"pre_{k}"] for k in metrics.RECALLS)
    zs = metrics.zeroshot_metrics({"a": 0.25, "b": 0.5}, {"a": 0.25, "b": 0.5})
    assert zs["zs_a_retained"] == zs["zs_b_retained"] == zs["zeroshot_retained"] == 1


def test_rsa_of_three_points_by_hand():
    """Cosines of (1,0), (0,1), (1,1): 0, 1/√2, 1/√2; after doubling the second coordinate the third point is
    (1,2): 0, 1/√5, 2/√5. Pearson of (0, a, a) and (0, b, c): here √3/2."""
    pre = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    moved = pre * torch.tensor([1.0, 2.0])
    assert metrics.pair_metrics((moved, pre), (pre, pre))["rsa_image"] == pytest.approx(math.sqrt(3) / 2, abs=1e-6)


def test_monitor_measures_a_known_perturbation(pairs, suite):
    """The toy model's image projection scaled (1, 2) after the pre-trained side was embedded: image RSA √3/2
    (above), text unchanged (RSA 1, ‖v‖ 0), ‖u‖ = mean over the points of ‖(1,2)/√5 − (1,1)/√2‖ (only the
    third point moves), zero-shot: unchanged on the red/green images, so retained 1."""
    args = make_args(retention_data=pairs, retention_suite=suite)
    m, model = monitor(args), ToyCLIP()
    m.ensure_pretrained(args, model, frozen=None)
    data = {"train": Namespace(dataloader=Namespace(num_batches=5))}
    unmoved = m.evaluate(args, model, data, epoch=1)
    assert unmoved["retention/rsa_image"] == pytest.approx(1) and unmoved["retention/rsa_text"] == pytest.approx(1)
    assert unmoved["retention/u_norm"] == 0 and unmoved["retention/zeroshot_retained"] == 1
    assert unmoved["retention/step"] == 5 and unmoved["retention/epoch"] == 1
    model.proj.weight.data = torch.diag(torch.tensor([1.0, 2.0]))
    out = m.evaluate(args, model, data, epoch=3)
    assert out["retention/rsa_image"] == pytest.approx(math.sqrt(3) / 2, abs=1e-6)
    assert out["retention/rsa_text"] == pytest.approx(1) and out["retention/v_norm"] == 0
    assert out["retention/u_norm"] == pytest.approx(math.sqrt(2 - 6 / math.sqrt(10)) / 3, abs=1e-6)
    assert out["retention/zs_toy_top1"] == out["retention/zs_toy_pre_top1"] == 1
    assert out["retention/zeroshot_retained"] == 1
    args.retention_frequency = 2  # epochs 2, 4, ... and the last one (3 of 3)
    assert [bool(m.evaluate(args, model, data, epoch=e)) for e in (1, 2, 3)] == [False, True, True]


def test_the_frozen_model_gives_the_pretrained_side(pairs):
    args = make_args(retention_data=pairs)
    m, model, frozen = monitor(args), ToyCLIP(), ToyCLIP()
    model.proj.weight.data = torch.diag(torch.tensor([1.0, 2.0]))  # already moved: the frozen copy is the reference
    m.ensure_pretrained(args, model, frozen=frozen)
    out = m.evaluate(args, model, {}, epoch=1)
    assert out["retention/rsa_image"] == pytest.approx(math.sqrt(3) / 2, abs=1e-6)
    # resumed with no cached side and no frozen model: the pre-trained side is gone, so it is an error
    with pytest.raises(retention.RetentionError, match="--resume ckpt.pt holds no pre-trained retention side"):
        monitor(make_args(retention_data=pairs, resume="ckpt.pt")).ensure_pretrained(
            make_args(retention_data=pairs, resume="ckpt.pt"), model, frozen=None)


def test_the_cached_side_is_restored_only_for_the_same_settings(pairs):
    args = make_args(retention_data=pairs)
    m = monitor(args)
    m.ensure_pretrained(args, ToyCLIP(), frozen=None)
    state = m.state_dict()
    assert state["image"].shape == (3, 2) and state["indices"].tolist() == [0, 1, 2]
    again = monitor(make_args(retention_data=pairs, resume="x.pt"))
    again.load_state_dict(state)
    assert torch.equal(again.pretrained["image"], state["image"])
    other = monitor(make_args(retention_data=pairs, retention_samples=3, resume="x.pt"))
    other.load_state_dict(state)  # other settings: not used
    assert other.pretrained is None


@pytest.mark.parametrize("flags, match", [
    (dict(retention_data="/nowhere/{0..1}.tar"), r"--retention-data '/nowhere/\{0..1\}.tar': no readable shard"),
    (dict(retention_suite="/nowhere/suite.json"), r"--retention-suite /nowhere/suite.json: .*No such file"),
    (dict(retention_samples=5), r"--retention-samples given without --retention-data or --retention-suite"),
    (dict(retention_data="s3://bucket/{0..1}.tar"), r"--retention-data s3://bucket/0.tar: give local shard files"),
    (dict(retention_frequency=0, retention_suite="S"), r"--retention-frequency 0: must be >= 1"),
    (dict(retention_samples=2, retention_suite="S"), r"--retention-samples 2: must be >= 3"),
])
def test_bad_flags_name_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        retention.validate_args(make_args(**flags))


def test_a_suite_without_zero_shot_datasets_is_refused(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"datasets": [{"name": "r", "role": "retrieval", "path": str(tmp_path)}]}))
    with pytest.raises(ValueError, match=r"--retention-suite .*suite.json: no dataset with role zeroshot or ood"):
        retention.validate_args(make_args(retention_suite=str(path)))


def test_retention_flags_are_the_ones_a_plain_run_may_give(pairs):
    from open_clip_train.params import parse_args
    from open_clip_train.plugins import PluginManager
    from openclip_robust.plugin import RobustPlugin

    def parse(*argv):
        return parse_args(["--train-data", "x.tar", *argv], PluginManager({"robust": RobustPlugin()}))

    assert parse("--retention-data", pairs, "--retention-frequency", "2").retention_frequency == 2
    with pytest.raises(SystemExit):
        parse("--retention-data", pairs, "--dive-lambda", "5")  # other plugin flags still need --robust-loss


def test_a_shard_that_cannot_be_opened_is_an_error_naming_the_flag(tmp_path, pairs):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar archive" * 100)
    args = make_args(retention_data=pairs)
    m = retention.RetentionMonitor()
    m.validate_args(args)
    m.urls = [broken]  # passed the check of its first sample, then became unreadable
    with pytest.raises(retention.RetentionError, match=r"--retention-data: ReadError"):
        m.setup(args, preprocess, tokenizer)
