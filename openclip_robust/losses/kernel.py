"""Kernel alignment, KUEA (seed 003): align the image tower's kernel matrix to a frozen vision teacher.

L = L_reg + w·L_kernel on target images only, text tower frozen:
  L_reg    = mean_i ||f_ft(x_i) − f_pre(x_i)||² on CLIP's projected, unnormalised image embeddings;
  L_kernel = mean over all pairs (i, j) of the global batch of (k̃_s(f_i, f_j) − k̃_t(h_i, h_j))²,
             h = teacher features. Normalised polynomial kernel k̃(a, b) = k(a, b)/sqrt(k(a, a)·k(b, b)),
             k(a, b) = (γ⟨a, b⟩ + c)^p; teacher γ = 1/d, c = 1 fixed; student γ, c trained (own
             param group, no weight decay) unless --kernel-fixed. Gaussian and cosine as options.
No contrastive term: KUEA trains on images alone.

--kernel-teacher-cache DIR (from `openclip-robust cache-teacher --train-data ... --kernel-teacher ...`)
replaces the teacher's forward by its cached features, read per shard in the loader workers and
delivered in the batch; no teacher is built. Target images then use the deterministic eval
transform, not the random train transform, so that they are the pixels the cache was computed from
(the price of exactness: no augmentation).
"""
import logging

import torch
from open_clip.loss import gather_features
from torch import nn

from openclip_robust.teachers import cache as teacher_cache
from openclip_robust.data.image_only import get_image_only_wds, is_webdataset
from openclip_robust import precise
from openclip_robust.losses.base import RobustLoss, fp32, sq_dist
from openclip_robust.checks import require
from openclip_robust.losses.registry import register_loss
from openclip_robust.teachers.vision import VisionTeacher, check_teacher_flags

CACHE_KIND = "kernel-teacher"

KERNELS = ("poly", "gaussian", "cosine")


def poly_kernel(x, gamma, coef, degree):
    """Normalised polynomial kernel matrix of the rows of x (unit diagonal)."""
    k = (gamma * x @ x.T + coef) ** degree
    diag = k.diagonal()
    return k / torch.sqrt(diag[:, None] * diag[None, :])


def gaussian_kernel(x, sigma):
    return torch.exp(-torch.cdist(x, x).pow(2) / (2 * sigma ** 2))


def cosine_kernel(x):
    x = nn.functional.normalize(x, dim=-1)
    return x @ x.T


class Kernel(nn.Module):
    """One side's kernel; its parameters train only where `trainable`."""

    def __init__(self, kind, degree=3, gamma=1.0, coef=1.0, sigma=1.0, trainable=False):
        super().__init__()
        self.kind, self.degree = kind, degree
        value = (lambda v: nn.Parameter(torch.tensor(float(v)))) if trainable else (lambda v: torch.tensor(float(v)))
        if kind == "poly":
            self._set("gamma", value(gamma), trainable)
            self._set("coef", value(coef), trainable)
        elif kind == "gaussian":
            self._set("sigma", value(sigma), trainable)

    def _set(self, name, tensor, trainable):
        if trainable:
            self.register_parameter(name, tensor)
        else:
            self.register_buffer(name, tensor)

    def forward(self, x):
        # outside autocast: it would run the matmuls in half precision, and kernel entries in [0, 1]
        # then carry errors (~1e-3 in bf16) as large as the student-teacher differences being trained
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = fp32(x)
            if self.kind == "poly":
                return poly_kernel(x, self.gamma, self.coef, self.degree)
            if self.kind == "gaussian":
                return gaussian_kernel(x, self.sigma)
            return cosine_kernel(x)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@register_loss("kernel")
class KernelAlignmentLoss(RobustLoss):
    needs_frozen = True  # L_reg's f_pre; the frozen copy's text tower is never run
    target_samples = "image"  # trains on images alone (ImageNet-train shards have no captions)
    resume_settings = ("kernel_type", "kernel_degree", "kernel_fixed")  # which kernel parameters exist

    @classmethod
    def add_args(cls, group):
        group.add_argument("--kernel-teacher", type=str, default=None,
                           help="timm model name of the frozen vision teacher, e.g. vit_large_patch14_reg4_dinov2.lvd142m")
        group.add_argument("--kernel-teacher-pretrained", type=str, default=None,
                           help="the teacher's weights: a local .safetensors/.pth/.bin file (nothing downloads)")
        group.add_argument("--kernel-weight", type=float, default=0.5, help="w in L_reg + w·L_kernel.")
        group.add_argument("--kernel-type", choices=KERNELS, default="poly", help="kernel function.")
        group.add_argument("--kernel-degree", type=int, default=3, help="degree of the polynomial kernel.")
        group.add_argument("--kernel-gamma", type=float, default=0.0032, help="student polynomial γ, initial value.")
        group.add_argument("--kernel-coef", type=float, default=0.191623, help="student polynomial c, initial value.")
        group.add_argument("--kernel-sigma", type=float, default=8.7,
                           help="student Gaussian σ, initial value (KUEA's code: 8.7 for ViT-L-14).")
        group.add_argument("--kernel-teacher-sigma", type=float, default=15.8,
                           help="teacher Gaussian σ, fixed (KUEA's code: 15.8 for DINOv2 ViT-L/14).")
        group.add_argument("--kernel-teacher-image-size", type=int, default=None,
                           help="teacher input resolution (default: the teacher's own, from timm's data config; "
                                "DINOv2: 518). ViT position embeddings are resampled to it.")
        group.add_argument("--kernel-fixed", action="store_true",
                           help="keep the student kernel parameters at their initial values.")
        group.add_argument("--kernel-teacher-cache", type=str, default=None, metavar="DIR",
                           help="the teacher's features of the --train-data images from `openclip-robust "
                                "cache-teacher --train-data ... --kernel-teacher ...`: read them instead of running "
                                "the teacher (webdataset shards only). Target images then use the deterministic "
                                "eval transform (no augmentation). Refused if its teacher, teacher weights, "
                                "teacher image size or the student's preprocessing differ from this run's.")

    @classmethod
    def validate_args(cls, args):
        if precise.wants_fp32(args) and str(getattr(args, "precision", "")).startswith("pure"):
            raise ValueError(f"--robust-loss kernel --precision {args.precision}: the student's image tower holds "
                             f"half-precision weights, so L_reg's f_ft - f_pre cannot be computed in fp32 "
                             f"(--diff-precision fp32); use --precision amp_bf16, or --diff-precision autocast")
        require(args, "kernel_weight", low=0.0)
        if args.kernel_type == "poly":
            require(args, "kernel_degree", low=1)
            require(args, "kernel_gamma", low=0.0, low_open=True)
            require(args, "kernel_coef", low=0.0)  # c < 0 can make k(a, a) negative: its square root is NaN
        if args.kernel_type == "gaussian":
            require(args, "kernel_sigma", low=0.0, low_open=True)
            require(args, "kernel_teacher_sigma", low=0.0, low_open=True)
        check_teacher_flags(args.kernel_teacher, args.kernel_teacher_pretrained, args.kernel_teacher_image_size)
        if args.kernel_teacher_cache:
            if not args.train_data or not is_webdataset(args):
                raise ValueError(f"--kernel-teacher-cache: --train-data {args.train_data!r} is not read as webdataset "
                                 f"shards (--dataset-type {args.dataset_type}); the cache is keyed by webdataset "
                                 f"sample keys, which csv rows and synthetic data lack: drop the flag")
            # teacher fields now (before any model is built); the student's preprocessing in add_data
            manifest = teacher_cache.read_manifest(args.kernel_teacher_cache, CACHE_KIND)
            teacher_cache.check_provenance(manifest["provenance"], cls.cache_provenance(args),
                                           args.kernel_teacher_cache, CACHE_KIND)

    @staticmethod
    def cache_provenance(args, preprocess=None):
        return teacher_cache.kernel_teacher_provenance(args.kernel_teacher, args.kernel_teacher_pretrained,
                                                       args.kernel_teacher_image_size, preprocess, args.model,
                                                       args.precision)

    def __init__(self, args):
        super().__init__(args)
        self.args = args
        self.weight = args.kernel_weight
        self.student_kernel = Kernel(args.kernel_type, args.kernel_degree, args.kernel_gamma, args.kernel_coef,
                                     args.kernel_sigma, trainable=not args.kernel_fixed)
        self.teacher, self.teacher_kernel, self._student_out = None, None, None
        self.cache = None  # --kernel-teacher-cache: TeacherCache, read by the loader (rows in batch[3])

    # The student's unnormalised projected embedding is the image tower's output, which CLIP's
    # forward normalises before it reaches the loss: a forward hook keeps it, at no extra cost.
    def _keep_output(self, module, inputs, output):
        self._student_out = output

    def setup(self, args, model):
        for name, p in model.named_parameters():
            if not name.startswith("visual."):
                p.requires_grad_(False)  # text tower, logit scale: frozen and untouched
        if args.kernel_teacher_cache:  # no teacher model: its features come from the cache
            self.cache = teacher_cache.TeacherCache(args.kernel_teacher_cache, CACHE_KIND)
            d = self.cache.dims()["teacher_features"]
        else:
            cfg = model.visual.preprocess_cfg
            # not a submodule: kept out of the loss's state_dict, so never saved in checkpoints
            teacher = VisionTeacher(args.kernel_teacher, args.kernel_teacher_pretrained, cfg["mean"], cfg["std"],
                                    image_size=args.kernel_teacher_image_size)
            object.__setattr__(self, "teacher", teacher.to(args.device))
            d = self.teacher.dim
        self.teacher_kernel = Kernel(args.kernel_type, args.kernel_degree, gamma=1.0 / d, coef=1.0,
                                     sigma=args.kernel_teacher_sigma).to(args.device)
        self.student_kernel.to(args.device)
        self.scale_grads_per_step(self.student_kernel.parameters(), args.accum_freq)
        if self.precise:  # L_reg differences f_ft with the frozen f_pre: the tower runs in fp32
            precise.fp32_module(model.visual)
        model.visual.register_forward_hook(self._keep_output)

    def param_groups(self):
        params = [p for p in self.student_kernel.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}] if params else []

    def add_data(self, args, data, preprocess_fns, epoch, tokenizer):
        if not is_webdataset(args):  # csv rows and synthetic data keep upstream's loader
            return
        if self.cache is None:
            data["train"] = get_image_only_wds(args, preprocess_fns[0], epoch, tokenizer)
            return
        # the cache holds the teacher's view of the eval-transformed image: train on exactly those pixels
        preprocess = preprocess_fns[1]
        teacher_cache.assert_deterministic(preprocess, "the target preprocessing for --kernel-teacher-cache")
        self.cache.check(self.cache_provenance(args, preprocess), teacher_cache.target_shards(args.train_data))
        data["train"] = get_image_only_wds(args, preprocess, epoch, tokenizer, teacher_cache=self.cache)
        logging.info(f"openclip-robust: kernel teacher features from {args.kernel_teacher_cache} ({len(self.cache)} "
                     f"samples x {self.cache.dims()['teacher_features']} {self.cache.manifest['dtype']}, "
                     f"{self.cache.nbytes() / 2 ** 20:.1f} MiB memory-mapped, read per shard by the loader); no "
                     f"teacher is run, and the target images use the deterministic eval transform (no augmentation) "
                     f"so that they match the cache")

    def teacher_features(self, images, batch=None):
        """The teacher's features of this batch: computed, or the cached rows its loader put in it."""
        if self.cache is None:
            return self.teacher(images)
        if batch is None or len(batch) < 4:
            raise RuntimeError("--kernel-teacher-cache: the cached rows come in each batch of the image-only "
                               "webdataset loader built by add_data (after the sample keys), and this batch has none")
        rows = batch[3]
        if rows.shape[0] != images.shape[0]:
            raise RuntimeError(f"--kernel-teacher-cache: {rows.shape[0]} cached rows for a batch of "
                               f"{images.shape[0]} images")
        return rows.to(images.device, non_blocking=True)

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        student, self._student_out = self._student_out, None
        with torch.no_grad():
            pre = precise.forward(self.precise, frozen.encode_image, images, normalize=False)
        return {"kernel_student": student, "kernel_pre": pre, "kernel_teacher": self.teacher_features(images, batch)}

    def forward(self, image_features, text_features, logit_scale, kernel_student, kernel_pre, kernel_teacher,
                output_dict=False, **_):
        a = self.args
        reg = sq_dist(kernel_student, kernel_pre).mean()
        if a.world_size > 1:  # the kernel is over the global batch; gradient through the local rows
            if not a.gather_with_grad:
                # DDP averages gradients over ranks, but each rank's gradient of the (identical) global
                # kernel loss reaches only its own rows: their sum over ranks is the global gradient,
                # so scale by world size to keep w's weight against L_reg what it is on one process.
                # (Gathering with grad sums the ranks' gradients itself.) The kernel parameters see
                # the global kernel on every rank and keep their plain gradient.
                kernel_student = ScaleGrad.apply(kernel_student, a.world_size)
            kernel_student, kernel_teacher = gather_features(kernel_student, kernel_teacher, local_loss=False,
                                                             gather_with_grad=a.gather_with_grad, rank=a.rank,
                                                             world_size=a.world_size, use_horovod=a.horovod)
        k_s, k_t = self.student_kernel(kernel_student), self.teacher_kernel(kernel_teacher)
        losses = {"kernel_reg": reg, "kernel_align": self.weight * (k_s - k_t).pow(2).mean()}
        if not output_dict:
            return sum(losses.values())
        log_only = {f"kernel_{n}": p.detach() for n, p in self.student_kernel.named_parameters()}
        if log_only:
            losses["log_only"] = log_only
        return losses
