"""Kernel alignment (KUEA) as --robust-loss kernel: kernels by hand, what trains, the teacher's view,
end to end on image-only shards, two processes, bad input."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import timm
import torch
from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager

from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import digits_samples
from openclip_robust.teachers.frozen import frozen_copy
from openclip_robust.losses.kernel import Kernel, KernelAlignmentLoss, poly_kernel
from openclip_robust.plugin import RobustPlugin

from test_training_e2e import logged, run_main, train_args

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def image_only_shards(tmp_path_factory):
    samples = [{"png": s["png"]} for s in digits_samples(64)]  # no caption, no class: ImageNet-train style
    return write_samples(str(tmp_path_factory.mktemp("images")), samples, 32)["shards"]


def kernel_args(teacher, *extra):
    argv = ["--robust-loss", "kernel", "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher, *extra]
    args = parse_args(argv, PluginManager({"robust": SimpleNamespace(add_args=RobustPlugin().add_args)}))
    args.distill, args.rank, args.world_size, args.device = False, 0, 1, "cpu"  # what main() sets
    return args


# -- kernels by hand ---------------------------------------------------------------------------------
def test_poly_kernel_by_hand_and_unit_diagonal():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    k = poly_kernel(x, gamma=0.5, coef=1.0, degree=3)
    raw = lambda a, b: (0.5 * float(a @ b) + 1.0) ** 3  # noqa: E731
    expected = raw(x[0], x[1]) / (raw(x[0], x[0]) * raw(x[1], x[1])) ** 0.5  # (0.5·-2+1)³ = 0
    assert k[0, 1].item() == pytest.approx(expected) and expected == 0.0
    # by hand: k(a,a) = (0.5·1 + 1)³ = 3.375, k(b,b) = (0.5·2 + 1)³ = 8, k(a,b) = (0.5·1 + 1)³ = 3.375,
    # so k̃(a,b) = 3.375 / sqrt(3.375·8) = 0.649519...
    k = poly_kernel(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), gamma=0.5, coef=1.0, degree=3)
    assert k[0, 1].item() == pytest.approx(0.6495190528) and k[1, 0].item() == pytest.approx(0.6495190528)
    x = torch.randn(5, 4)
    for kernel in (Kernel("poly", 3, 0.3, 0.7), Kernel("gaussian", sigma=2.0), Kernel("cosine")):
        assert torch.allclose(kernel(x).diagonal(), torch.ones(5))
    g = Kernel("gaussian", sigma=2.0)(x)
    assert g[1, 3].item() == pytest.approx(torch.exp(-(x[1] - x[3]).pow(2).sum() / 8).item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["poly", "gaussian", "cosine"])
def test_kernels_stay_fp32_under_autocast(kind):
    x = torch.randn(16, 64) * 3
    kernel = Kernel(kind, 3, gamma=0.01, coef=0.2, sigma=20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = kernel(x.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, kernel(x.bfloat16().float()), rtol=0, atol=0)


def test_kernel_loss_is_zero_when_student_and_teacher_coincide(teacher_file):
    args = kernel_args(teacher_file, "--kernel-gamma", "0.25", "--kernel-coef", "1.0")
    loss = KernelAlignmentLoss(args)
    loss.teacher_kernel = Kernel("poly", 3, gamma=0.25, coef=1.0)
    f = torch.randn(6, 4)
    out = loss(None, None, None, kernel_student=f, kernel_pre=f, kernel_teacher=f, output_dict=True)
    assert out["kernel_reg"].item() == 0.0 and out["kernel_align"].item() == pytest.approx(0.0, abs=1e-12)
    other = loss(None, None, None, kernel_student=f, kernel_pre=f + 1, kernel_teacher=torch.randn(6, 4),
                 output_dict=True)
    assert other["kernel_reg"].item() == pytest.approx(4.0) and other["kernel_align"].item() > 0


# -- what trains -------------------------------------------------------------------------------------
def train_a_few_steps(tiny_model_dir, teacher_file, *extra, steps=3):
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tiny_model_dir}", output_dict=True)
    args = kernel_args(teacher_file, *extra)
    args.device = "cpu"
    frozen = frozen_copy(model)
    loss = KernelAlignmentLoss(args)
    loss.setup(args, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trainable}, *loss.param_groups()], lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in loss.teacher.state_dict().items()}
    kernel_before = {k: v.clone() for k, v in loss.student_kernel.state_dict().items()}
    images = torch.randn(8, 3, 32, 32)
    for _ in range(steps):
        out = model(images, None)
        losses = loss(**out, **loss.step_inputs(model, frozen, images, None), output_dict=True)
        opt.zero_grad()
        sum(v for k, v in losses.items() if k != "log_only").backward()
        opt.step()
    return model, loss, opt, before, teacher_before, kernel_before


def test_kernel_parameters_train_and_only_the_image_tower_moves(tiny_model_dir, teacher_file):
    model, loss, opt, before, teacher_before, kernel_before = train_a_few_steps(tiny_model_dir, teacher_file)
    assert loss.teacher.dim == 64 and list(loss.teacher_kernel.parameters()) == []  # teacher: γ = 1/d, c = 1 fixed
    assert loss.teacher_kernel.gamma.item() == pytest.approx(1 / 64) and loss.teacher_kernel.coef.item() == 1.0
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in loss.student_kernel.parameters()}
    for name, value in loss.student_kernel.state_dict().items():  # gamma and c really train
        assert value.item() != kernel_before[name].item(), name
    after = model.state_dict()
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            continue
        assert torch.equal(after[name], before[name]) and p.grad is None, name  # text tower, logit scale
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("visual."))
    for name, value in loss.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_kernel_fixed_keeps_the_initial_values(tiny_model_dir, teacher_file):
    _, loss, opt, _, _, kernel_before = train_a_few_steps(tiny_model_dir, teacher_file, "--kernel-fixed")
    assert len(opt.param_groups) == 1 and loss.param_groups() == []
    assert loss.student_kernel.gamma.item() == pytest.approx(0.0032)
    assert {k: v.item() for k, v in loss.student_kernel.state_dict().items()} == \
        {k: v.item() for k, v in kernel_before.items()}


def test_teacher_sees_its_own_normalisation_and_resolution(tiny_model_dir, teacher_file):
    from openclip_robust.teachers.vision import VisionTeacher
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    teacher = VisionTeacher("test_vit", teacher_file, clip_mean, clip_std)
    pixels = torch.full((1, 3, 32, 32), 0.25)
    student = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    view = teacher.view(student)
    assert view.shape == (1, 3, 160, 160)
    assert torch.allclose(view, torch.full_like(view, (0.25 - 0.5) / 0.5), atol=1e-5)


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernel_trains_on_image_only_shards_in_upstreams_loop(tmp_path, tiny_model_dir, image_only_shards,
                                                               teacher_file):
    argv = train_args(tmp_path, "kernel", tiny_model_dir, image_only_shards, "--robust-loss", "kernel",
                      "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
                      "--precision", "fp32", epochs=2, samples=64)
    assert run_main(argv) is None
    reg, align = logged(tmp_path, "kernel", "Kernel_reg"), logged(tmp_path, "kernel", "Kernel_align")
    gamma, coef = logged(tmp_path, "kernel", "Kernel_gamma"), logged(tmp_path, "kernel", "Kernel_coef")
    assert len(align) >= 4 and all(v == v and abs(v) < 1e6 for v in reg + align)
    assert reg[0] < 1e-9 < max(reg)  # the student starts at the pre-trained model, then moves
    assert gamma[-1] != gamma[0] and coef[-1] != coef[0]
    ckpt = torch.load(tmp_path / "logs" / "kernel" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    init = torch.load(os.path.join(tiny_model_dir, "open_clip_pytorch_model.bin"), weights_only=True)
    for name, value in init.items():
        same = torch.equal(ckpt[name], value)
        assert same != name.startswith("visual.") or not value.is_floating_point(), name


@pytest.mark.slow
@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_ddp_processes_train_exactly_like_one_process_on_the_global_batch(tmp_path, tiny_model_dir, teacher_file,
                                                                              gather_with_grad):
    """Same kernel loss, same image tower and kernel parameters after two SGD steps (DDP, gloo)."""
    from dist_kernel_worker import run
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29600 + os.getpid() % 300 + 300 * gather_with_grad),
           str(HERE / "dist_kernel_worker.py"), tiny_model_dir, teacher_file, str(tmp_path),
           *(["--gather-with-grad"] if gather_with_grad else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run(tiny_model_dir, teacher_file, rank=0, world=1)
    reg = lambda r: r["losses"][:, 0]  # noqa: E731 -- a per-rank mean: the ranks' average is the global one
    torch.testing.assert_close((reg(ranks[0]) + reg(ranks[1])) / 2, reg(single), rtol=1e-5, atol=1e-9)
    for r in ranks:
        torch.testing.assert_close(r["losses"][:, 1], single["losses"][:, 1], rtol=1e-5, atol=1e-9)
        for name, value in single["visual"].items():
            torch.testing.assert_close(r["visual"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        for name, value in single["kernel"].items():
            torch.testing.assert_close(r["kernel"][name], value, rtol=1e-5, atol=1e-8, msg=name)
    assert single["losses"][1, 0] > 0  # step 2 has L_reg > 0: its weight against L_kernel is compared too
    init = open_clip.create_model(f"local-dir:{tiny_model_dir}").visual.state_dict()
    assert any(not torch.allclose(single["visual"][n], init[n]) for n in init)  # the steps moved the tower


@pytest.mark.slow
def test_kernel_trains_under_torchrun_ddp_on_image_only_shards(tmp_path, tiny_model_dir, image_only_shards,
                                                               teacher_file):
    """upstream's main under torchrun (gloo, CPU): image-only shards, a rank each, kernel parameters trained."""
    from test_dive_distributed import torchrun
    torchrun(["-m", "open_clip_train.main", "--model", f"local-dir:{tiny_model_dir}", "--train-data",
              image_only_shards, "--train-num-samples", "64", "--dataset-type", "webdataset", "--batch-size", "8",
              "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
              "--name", "ddp", "--robust-loss", "kernel", "--kernel-teacher", "test_vit",
              "--kernel-teacher-pretrained", teacher_file, "--kernel-teacher-image-size", "48",
              "--logs-dir", str(tmp_path / "runs")], cwd=tmp_path)
    log = (tmp_path / "runs" / "ddp" / "out.log").read_text()
    assert "total 2" in log and len(re.findall(r"Kernel_align: [0-9.e+-]+ \(", log)) == 4  # 64 / (8 x 2)
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "epoch_1.pt", weights_only=True)
    kernel = ckpt["plugins"]["robust"]["loss"]
    assert kernel["student_kernel.gamma"].item() != pytest.approx(0.0032, abs=1e-7)
    assert kernel["teacher_kernel.gamma"].item() == pytest.approx(1 / 64)
    assert not any(k.startswith("teacher.") for k in kernel)  # the teacher is never checkpointed


def test_teacher_image_size_override_resamples_position_embeddings(teacher_file):
    from openclip_robust.teachers.vision import VisionTeacher
    teacher = VisionTeacher("test_vit", teacher_file, (0.5,) * 3, (0.5,) * 3, image_size=48)
    assert teacher.size == (48, 48) and teacher.view(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 48, 48)
    saved = torch.load(teacher_file)["pos_embed"]  # 160 px / 16 = 10 x 10 patches + the class token
    assert saved.shape[1] == 101 and teacher.model.pos_embed.shape[1] == 3 * 3 + 1
    torch.testing.assert_close(teacher.model.pos_embed[:, 0], saved[:, 0])  # class token's embedding kept
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_gaussian_kernel_uses_the_teacher_sigma_flag(tiny_model_dir, teacher_file):
    args = kernel_args(teacher_file, "--kernel-type", "gaussian", "--kernel-teacher-sigma", "3.5",
                       "--kernel-sigma", "2.0", "--kernel-teacher-image-size", "32")
    loss = KernelAlignmentLoss(args)
    loss.setup(args, open_clip.create_model(f"local-dir:{tiny_model_dir}"))
    assert loss.teacher_kernel.sigma.item() == 3.5 and list(loss.teacher_kernel.parameters()) == []
    assert [p.item() for p in loss.student_kernel.parameters()] == [2.0]


# -- bad input ---------------------------------------------------------------------------------------
def plugin_error(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv, PluginManager({"robust": RobustPlugin()}))
    return capsys.readouterr().err


def test_missing_teacher_file_and_unknown_name_are_clear_errors(tmp_path, teacher_file, capsys):
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher", "test_vit",
                        "--kernel-teacher-pretrained", str(tmp_path / "nope.pth")], capsys)
    assert "--kernel-teacher-pretrained" in err and "nope.pth: file not found" in err
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher", "dinov9_giant",
                        "--kernel-teacher-pretrained", teacher_file], capsys)
    assert "--kernel-teacher 'dinov9_giant' is not a timm model name" in err
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher", "test_vit.bogus",  # timm.is_model says yes
                        "--kernel-teacher-pretrained", teacher_file], capsys)
    assert "--kernel-teacher 'test_vit.bogus': timm has no pretrained tag 'bogus'" in err and "test_vit.r160_in1k" in err
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher-pretrained", teacher_file], capsys)
    assert "needs --kernel-teacher" in err
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher", "test_vit"], capsys)
    assert "needs --kernel-teacher-pretrained" in err
    err = plugin_error(["--robust-loss", "kernel", "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained",
                        teacher_file, "--kernel-teacher-image-size", "0"], capsys)
    assert "--kernel-teacher-image-size 0: must be >= 1" in err


def test_unreadable_teacher_file_names_the_flag(tmp_path):
    from openclip_robust.teachers.vision import VisionTeacher
    garbage = tmp_path / "teacher.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--kernel-teacher-pretrained .*teacher.pth: not a readable checkpoint"):
        VisionTeacher("test_vit", str(garbage), (0.5,) * 3, (0.5,) * 3)


def test_teacher_with_the_wrong_output_shape_is_refused(tmp_path, teacher_file, monkeypatch):
    from openclip_robust.teachers.vision import VisionTeacher

    class SpatialOutput(torch.nn.Module):  # e.g. a backbone that returns feature maps, not pooled features
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.forward_features(x)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: SpatialOutput(real(*a, **k)))
    monkeypatch.setattr(SpatialOutput, "load_state_dict", lambda self, sd, strict=True: self.inner.load_state_dict(sd, strict))
    monkeypatch.setattr(timm.data, "resolve_data_config", lambda cfg, model: {"input_size": (3, 160, 160),
                        "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"})
    with pytest.raises(ValueError, match=r"returns \(2, \d+, 64\).*\[batch, dim\]"):
        VisionTeacher("test_vit", teacher_file, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="does not fit --kernel-teacher"):
        torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        monkeypatch.setattr(timm, "create_model", real)
        VisionTeacher("test_vit", str(tmp_path / "bad.pth"), (0.5,) * 3, (0.5,) * 3)


def test_weights_of_another_architecture_are_refused_with_the_first_mismatches(teacher_file):
    from openclip_robust.teachers.vision import VisionTeacher
    with pytest.raises(ValueError, match=r"does not fit --kernel-teacher vit_small_patch14_dinov2: size mismatch "
                                         r"for cls_token.*\(and \d+ more\)"):
        VisionTeacher("vit_small_patch14_dinov2", teacher_file, (0.5,) * 3, (0.5,) * 3)


# -- teacher cache on target images (--kernel-teacher-cache) ----------------------------------------
CACHE_SIZE = "48"  # teacher resolution in these tests: quick


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory, tiny_model_dir, image_only_shards, teacher_file):
    """Built by the command, in-process: the timm teacher's features of the 64 image-only samples."""
    from openclip_robust.__main__ import main as cli
    out = str(tmp_path_factory.mktemp("kcache") / "cache")
    assert cli(["cache-teacher", "--model", f"local-dir:{tiny_model_dir}", "--train-data", image_only_shards,
                "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
                "--kernel-teacher-image-size", CACHE_SIZE, "--out", out, "--batch-size", "20", "--workers", "1"]) == 0
    return out


def cache_flags(teacher_file, cache, *extra):
    return ["--robust-loss", "kernel", "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
            "--kernel-teacher-image-size", CACHE_SIZE, "--kernel-teacher-cache", cache, *extra]


def loss_with_cache(tiny_model_dir, shards, teacher_file, cache, workers=1, batch=8, image_mean=None):
    """The loss as the plugin sets it up (frozen copy, setup, add_data), and the train loader it builds."""
    args = kernel_args(teacher_file, "--kernel-teacher-image-size", CACHE_SIZE, "--kernel-teacher-cache", cache,
                       "--train-data", shards, "--train-num-samples", "64", "--dataset-type", "webdataset",
                       "--batch-size", str(batch), "--workers", str(workers), "--precision", "fp32")
    model, train_t, val_t = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}", output_dict=True,
                                                                 image_mean=image_mean)
    args.model = f"local-dir:{tiny_model_dir}"
    frozen = frozen_copy(model)
    loss = KernelAlignmentLoss(args)
    loss.setup(args, model)
    data = {}
    loss.add_data(args, data, (train_t, val_t), 0, open_clip.get_tokenizer(args.model))
    return model, frozen, loss, data["train"].dataloader


def test_kernel_cache_holds_the_teachers_view_of_every_target_image(kernel_cache, tiny_model_dir, image_only_shards,
                                                                     teacher_file):
    import webdataset as wds
    from openclip_robust.teachers.vision import VisionTeacher
    from openclip_robust.teachers.cache import TeacherCache, file_sha256
    cache = TeacherCache(kernel_cache, "kernel-teacher")
    record = cache.manifest["provenance"]
    assert cache.manifest["kind"] == "kernel-teacher" and len(cache) == 64 and cache.dims() == {"teacher_features": 64}
    assert record["teacher"] == "test_vit" and record["teacher_image_size"] == [48, 48]
    assert record["teacher_weights_sha256"] == file_sha256(teacher_file)
    _, _, val = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    sample = next(iter(wds.WebDataset(image_only_shards.replace("{000000..000001}", "000001"), shardshuffle=False)
                       .decode("pilrgb")))
    mean, std = val.transforms[-1].mean, val.transforms[-1].std
    want = VisionTeacher("test_vit", teacher_file, mean, std, image_size=48)(val(sample["png"])[None])
    torch.testing.assert_close(cache.lookup(sample["__url__"], [sample["__key__"]])["teacher_features"], want,
                               rtol=1e-5, atol=1e-6)


def test_cache_teacher_command_refuses_mixed_or_incomplete_flags(tmp_path, tiny_model_dir, image_only_shards,
                                                                  ref_shards, teacher_file, capsys):
    from openclip_robust.__main__ import main as cli
    base = ["cache-teacher", "--model", f"local-dir:{tiny_model_dir}", "--out", str(tmp_path / "c")]
    assert cli(base + ["--train-data", image_only_shards]) == 2
    assert "give --kernel-teacher and --kernel-teacher-pretrained" in capsys.readouterr().err
    assert cli(base + ["--train-data", image_only_shards, "--ref-data", ref_shards]) == 2
    assert "exactly one of them" in capsys.readouterr().err
    assert cli(base + ["--ref-data", ref_shards, "--kernel-teacher", "test_vit"]) == 2
    assert "--kernel-teacher is for a kernel-teacher cache" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cached_features_reach_step_inputs_batch_by_batch(kernel_cache, tiny_model_dir, image_only_shards,
                                                          teacher_file):
    """Two workers, 8 batches: each batch's looked-up rows are the teacher's features of its own images."""
    from openclip_robust.teachers.vision import VisionTeacher
    model, frozen, loss, loader = loss_with_cache(tiny_model_dir, image_only_shards, teacher_file, kernel_cache,
                                                  workers=2)
    assert loss.teacher is None  # no teacher built
    cfg = model.visual.preprocess_cfg
    teacher = VisionTeacher("test_vit", teacher_file, cfg["mean"], cfg["std"], image_size=48)
    empty = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")("")[0]
    n = 0
    for batch in loader:
        images, texts, keys, rows = batch  # the rows ride in the batch, read by the loader's workers
        got = loss.step_inputs(model, frozen, images, texts, batch=batch)["kernel_teacher"]
        torch.testing.assert_close(got, teacher(images), rtol=1e-5, atol=1e-6)
        assert torch.equal(texts, empty.expand_as(texts))  # the text slot is untouched
        n += 1
    assert n == 8 == loader.num_batches
    with pytest.raises(RuntimeError, match="this batch has none"):
        loss.step_inputs(model, frozen, images, texts, batch=(images, texts))
    with pytest.raises(RuntimeError, match="3 cached rows for a batch of"):
        loss.step_inputs(model, frozen, images, texts, batch=(images, texts, keys, rows[:3]))


@pytest.mark.slow
def test_cached_kernel_run_logs_the_same_losses_as_the_teacher(tmp_path, tiny_model_dir, image_only_shards,
                                                               teacher_file, kernel_cache, monkeypatch):
    # one step per epoch over all 64 samples: upstream's sample shuffle is unseeded, and both losses are
    # invariant to the order within the batch. The uncached run is given the eval transform too.
    kw = dict(epochs=3, batch=64, samples=64)
    flags = ["--robust-loss", "kernel", "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
             "--kernel-teacher-image-size", CACHE_SIZE, "--precision", "fp32"]
    real = KernelAlignmentLoss.add_data
    with monkeypatch.context() as m:
        m.setattr(KernelAlignmentLoss, "add_data",
                  lambda self, args, data, fns, epoch, tok: real(self, args, data, (fns[1], fns[1]), epoch, tok))
        assert run_main(train_args(tmp_path, "teacher", tiny_model_dir, image_only_shards, *flags, **kw)) is None
    assert run_main(train_args(tmp_path, "cached", tiny_model_dir, image_only_shards, *flags,
                               "--kernel-teacher-cache", kernel_cache, **kw)) is None
    log = (tmp_path / "logs" / "cached" / "out.log").read_text()
    assert "kernel teacher features from" in log and "deterministic eval transform" in log
    for key in ("Kernel_reg", "Kernel_align", "Kernel_gamma", "Kernel_coef"):
        plain, cached = logged(tmp_path, "teacher", key), logged(tmp_path, "cached", key)
        assert len(plain) == 3, (key, plain)
        assert cached == pytest.approx(plain, rel=1e-4, abs=1e-9), key
    # not vacuous: the teacher term is there from step 1, and the student has moved by step 2
    assert min(logged(tmp_path, "teacher", "Kernel_align")) > 1e-4
    assert max(logged(tmp_path, "teacher", "Kernel_reg")) > 1e-3


def test_stale_or_wrong_kernel_cache_is_refused_before_training(tmp_path, kernel_cache, image_only_shards,
                                                                ref_shards, teacher_file, capsys):
    other = tmp_path / "other_teacher.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), other)
    from openclip_robust.teachers.cache import file_sha256
    data = ["--train-data", image_only_shards]
    err = plugin_error(data + cache_flags(str(other), kernel_cache), capsys)
    assert "--kernel-teacher-cache" in err and "its teacher_weights_sha256 differs" in err
    assert file_sha256(teacher_file) in err and file_sha256(str(other)) in err and "--kernel-teacher-pretrained" in err
    err = plugin_error(data + cache_flags(teacher_file, kernel_cache, "--kernel-teacher-image-size", "64"), capsys)
    assert "its teacher_image_size differs" in err and "cache: [48, 48]" in err and "run:   [64, 64]" in err
    err = plugin_error(data + cache_flags(teacher_file, str(tmp_path / "none")), capsys)
    assert "--kernel-teacher-cache" in err and "no manifest.json there" in err and "cache-teacher --train-data" in err
    err = plugin_error(["--train-data", "synthetic", "--dataset-type", "synthetic"]
                       + cache_flags(teacher_file, kernel_cache), capsys)
    assert "--kernel-teacher-cache: --train-data 'synthetic' is not read as webdataset shards" in err
    reference = tmp_path / "ref_cache"  # a reference cache (no "kind": as written before kinds existed)
    reference.mkdir()
    (reference / "manifest.json").write_text('{"format": 1, "provenance": {}, "shards": [], "parts": []}')
    err = plugin_error(data + cache_flags(teacher_file, str(reference)), capsys)
    assert "a 'reference' cache" in err and "not a 'kernel-teacher' cache" in err
    err = plugin_error(["--train-data", image_only_shards, "--robust-loss", "dive", "--ref-data", ref_shards,
                        "--ref-teacher-cache", kernel_cache], capsys)
    assert "--ref-teacher-cache" in err and "a 'kernel-teacher' cache" in err


def test_kernel_cache_of_other_preprocessing_is_refused(kernel_cache, tiny_model_dir, image_only_shards, teacher_file):
    with pytest.raises(ValueError, match=r"its preprocess differs(.|\n)*run: .*(.|\n)*mean=.0\.5, 0\.5, 0\.5"):
        loss_with_cache(tiny_model_dir, image_only_shards, teacher_file, kernel_cache, image_mean=(0.5, 0.5, 0.5))


def test_sample_missing_from_the_kernel_cache_is_a_clear_error(tmp_path, kernel_cache, tiny_model_dir, teacher_file):
    import webdataset as wds
    samples = digits_samples(16)
    folder = tmp_path / "regenerated"  # same shard names as the cached ones, other sample keys
    folder.mkdir()
    for s in range(2):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for i in range(8):
                sink.write({"__key__": f"new{s}{i:03d}", "png": samples[8 * s + i]["png"]})
    model, frozen, loss, loader = loss_with_cache(tiny_model_dir, str(folder / "{000000..000001}.tar"),
                                                  teacher_file, kernel_cache)
    with pytest.raises(KeyError, match=rf"--kernel-teacher-cache {re.escape(kernel_cache)}: sample key 'new\d+' "
                                       rf"of .*regenerated/00000\d.tar is not cached; rebuild the cache over the "
                                       rf"same --train-data"):
        next(iter(loader))  # in the loader's worker, which reads the rows
