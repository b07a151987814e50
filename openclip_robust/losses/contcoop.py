"""Prompt learning on a frozen CLIP: ``contcoop`` (seed 004), with ``coop`` and ``kgcoop`` as its baselines.

L = CE(cos(w_i, f(x)) / τ) + λ·L_kd,  L_kd = 1/C Σ_i ‖w_i − w_zs,i‖₂  (Eq. 2–4), τ = 0.01, λ = 1.
  coop:     context only (no attention), λ = 0;
  kgcoop:   context only + the KD term;
  contcoop: class-conditioned context (attention over the class-name embeddings) + the KD term.
Both towers are frozen (no gradient, eval mode); only the prompt module trains and only it is in the
optimizer. The module file is written beside upstream's checkpoints each time they are saved.

Data: upstream's loader yields (image, caption tokens) and the model's forward runs on that pair, so
the class index cannot ride in the text slot as a bare integer. ``add_data`` replaces the train loader
with an exactly K-shot, seeded subset read by ``cls`` from the target shards, whose text slot holds the
tokens of the sample's class prompt "a photo of a {c}."; ``step_inputs`` recovers the class index by an
exact row match against the C class prompts (class names that tokenize identically are refused at
start). The forward's text features are thus the zero-shot features of each sample's class; unused.
"""
import io
import logging
import os
import random
import tarfile
from collections import defaultdict

import torch
import torch.nn.functional as F
from PIL import Image

from openclip_robust.data import shards as sh
from openclip_robust.data.shard_format import has_image, image_of, tar_samples
from openclip_robust.losses.base import RobustLoss, fp32
from openclip_robust.prompts import (ClassPrompts, PromptModule, TextTower, class_weights, token_space, unwrap,
                                     zeroshot_weights)
from openclip_robust.losses.registry import register_loss


# -- few-shot data -----------------------------------------------------------------------------------
def scan_classes(urls):
    """[(url, key, cls)] of every sample of the shards that has an image and a ``cls``."""
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for key, members in tar_samples(tar):
                if "cls" in members and has_image(members):
                    out.append((url, key, int(tar.extractfile(members["cls"]).read().decode().strip())))
    return out


def sample_k_shots(labels, k, seed, classnames):
    """Indices into `labels`: exactly k per class (sorted), drawn with `seed`; k = 0 keeps everything."""
    by_class = defaultdict(list)
    for i, c in enumerate(labels):
        if not 0 <= c < len(classnames):
            raise ValueError(f"a sample has class index {c}, outside the {len(classnames)} class names")
        by_class[c].append(i)
    if k == 0:
        return list(range(len(labels)))
    short = [f"{classnames[c]!r} ({len(by_class[c])})" for c in range(len(classnames)) if len(by_class[c]) < k]
    if short:
        raise ValueError(f"--prompt-shots {k}: these classes have fewer than {k} images: {', '.join(short)}; "
                         f"lower --prompt-shots or add images")
    rng = random.Random(seed)
    return sorted(i for c in range(len(classnames)) for i in rng.sample(by_class[c], k))


def read_samples(chosen):
    """{(url, key): image bytes} for the chosen (url, key, cls) rows."""
    wanted = defaultdict(set)
    for url, key, _ in chosen:
        wanted[url].add(key)
    images = {}
    for url, keys in wanted.items():
        with tarfile.open(url) as tar:
            for key, members in tar_samples(tar):
                if key in keys:
                    m = image_of(members)
                    images[(url, key)] = tar.extractfile(m).read()
    return [images[(url, key)] for url, key, _ in chosen]


class FewShotSet(torch.utils.data.Dataset):
    def __init__(self, images, labels, class_tokens, preprocess):
        self.images, self.labels, self.class_tokens, self.preprocess = images, labels, class_tokens, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.images[i])) as img:
            return self.preprocess(img.convert("RGB")), self.class_tokens[self.labels[i]]


class EpochShuffle(torch.utils.data.Sampler):
    """A new seeded order each epoch (upstream sets the epoch through DataInfo's SharedEpoch)."""

    def __init__(self, n, seed, shared_epoch):
        self.n, self.seed, self.shared_epoch = n, seed, shared_epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.shared_epoch.get_value())
        return iter(torch.randperm(self.n, generator=g).tolist())


def few_shot_loader(args, preprocess, epoch, class_tokens, classnames):
    from open_clip_train.data import DataInfo, SharedEpoch
    rows = scan_classes(sh.shard_list(args.train_data))
    if not rows:
        raise ValueError(f"--train-data {args.train_data}: no sample has both an image and a 'cls' entry "
                         f"(write target shards with `python -m openclip_robust make-target-shards`)")
    chosen = [rows[i] for i in sample_k_shots([r[2] for r in rows], args.prompt_shots, args.seed, classnames)]
    labels = [r[2] for r in chosen]
    dataset = FewShotSet(read_samples(chosen), labels, class_tokens.cpu(), preprocess)
    shared_epoch = SharedEpoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         sampler=EpochShuffle(len(dataset), args.seed, shared_epoch),
                                         persistent_workers=args.workers > 0)
    loader.num_samples, loader.num_batches = len(dataset), len(loader)
    logging.info(f"openclip-robust: {len(dataset)} training images "
                 f"({args.prompt_shots or 'all'} per class x {len(classnames)} classes, seed {args.seed})")
    return DataInfo(loader, None, shared_epoch)


def default_classnames_file(train_data):
    return os.path.join(os.path.dirname(sh.shard_list(train_data)[0]), "classnames.txt")


# -- the losses --------------------------------------------------------------------------------------
@register_loss("contcoop")
class ContCoOpLoss(RobustLoss):
    supports_accumulation = False  # its class weights are per class, not per sample: upstream cannot cache them
    target_samples = None  # its few-shot loader reads 'cls' from every sample up front and checks it there
    resume_settings = ("prompt_n_ctx", "prompt_init")  # the learned context's shape
    attention = True
    kd = True

    @classmethod
    def add_args(cls, group):  # shared by coop / kgcoop (they inherit without adding flags again)
        if cls is not ContCoOpLoss:
            return
        group.add_argument("--class-names", type=str, default=None, metavar="FILE",
                           help="prompt learning (coop, kgcoop, contcoop): class names, one per line, in class-index "
                                "order (default: classnames.txt beside --train-data)")
        group.add_argument("--prompt-n-ctx", type=int, default=None,
                           help="number of context tokens N (default 16; with --prompt-init: its token count)")
        group.add_argument("--prompt-init", type=str, default=None,
                           help="initialise the context from these words, e.g. 'a photo of a' (default: random, std 0.02)")
        group.add_argument("--prompt-kd-lambda", type=float, default=1.0,
                           help="λ of the KD term 1/C Σ‖w_i − w_zs,i‖ (kgcoop, contcoop)")
        group.add_argument("--prompt-shots", type=int, default=16,
                           help="K images per class drawn from --train-data with --seed (0: all images)")
        group.add_argument("--prompt-temperature", type=float, default=0.01, help="τ of the class logits")
        group.add_argument("--prompt-zs-template", type=str, default="a photo of a {c}.",
                           help="template of the zero-shot weights w_zs and of the loader's class captions")
        group.add_argument("--prompt-class-chunk", type=int, default=256,
                           help="classes per text-tower pass (activation memory ~ chunk x context x width)")

    @classmethod
    def validate_args(cls, args):
        checks = [(args.prompt_shots < 0, "--prompt-shots must be >= 0"),
                  (args.prompt_n_ctx is not None and args.prompt_n_ctx < 1, "--prompt-n-ctx must be >= 1"),
                  (args.prompt_kd_lambda < 0, "--prompt-kd-lambda must be >= 0"),
                  (args.prompt_temperature <= 0, "--prompt-temperature must be > 0"),
                  (args.prompt_class_chunk < 1, "--prompt-class-chunk must be >= 1"),
                  ("{c}" not in args.prompt_zs_template, "--prompt-zs-template needs {c} where the class name goes"),
                  (not cls.kd and args.prompt_kd_lambda != 1.0,
                   f"--robust-loss {cls.name} has no KD term: drop --prompt-kd-lambda or use kgcoop/contcoop"),
                  (args.robust_bn != "frozen", f"--robust-bn train: {cls.name} keeps both towers frozen in eval mode"),
                  (args.lock_image and args.lock_image_unlocked_groups > 0,
                   "--lock-image-unlocked-groups would unfreeze image blocks; the towers are frozen already: drop it"),
                  (args.lock_text and (args.lock_text_unlocked_layers > 0 or not args.lock_text_freeze_layer_norm),
                   "--lock-text without --lock-text-freeze-layer-norm (or with unlocked layers) would unfreeze text "
                   "parameters; the towers are frozen already: drop --lock-text")]
        for bad, message in checks:
            if bad:
                raise ValueError(f"--robust-loss {cls.name}: {message}")
        if not args.train_data:
            raise ValueError(f"--robust-loss {cls.name} needs --train-data: target shards with 'cls' per sample")
        names = args.class_names or default_classnames_file(args.train_data)
        if not os.path.isfile(names):
            raise ValueError(f"--class-names: {names} not found; give --class-names FILE (one name per line)")
        args.class_names = names

    def __init__(self, args):
        super().__init__(args)
        self.args = args
        self.lam = args.prompt_kd_lambda if self.kd else 0.0
        self.module = None
        self._save_dir, self._steps, self._batches = None, 0, None

    def setup(self, args, model):
        import open_clip
        if args.world_size > 1:
            raise ValueError(f"--robust-loss {self.name} trains on one process (few-shot, frozen towers); "
                             f"run without torchrun / with one GPU")
        model.requires_grad_(False)  # both towers and logit_scale: upstream's own param groups end up empty
        model.eval()
        tokenizer = open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir,
                                            context_length=args.force_context_length)
        self.tower, self.tokenizer = TextTower(model), tokenizer
        self.classnames = sh.read_lines(args.class_names)
        init, n_ctx = None, args.prompt_n_ctx or 16
        if args.prompt_init:
            ids = tokenizer([args.prompt_init])[0]
            pad = int(tokenizer([""])[0, -1])
            count = int((ids != pad).sum()) - 2
            if args.prompt_n_ctx not in (None, count):
                raise ValueError(f"--prompt-init {args.prompt_init!r} is {count} tokens but --prompt-n-ctx is "
                                 f"{args.prompt_n_ctx}: drop --prompt-n-ctx or make them agree")
            n_ctx = count
            with torch.no_grad():
                init = self.tower.embed(ids[1:1 + count].to(args.device)).detach().float().cpu()
        self.module = PromptModule(n_ctx, self.tower.width, self.attention, token_space(model, tokenizer),
                                   args.prompt_init, init).to(args.device)
        self.prompts = ClassPrompts(self.tower, tokenizer, self.classnames, n_ctx, args.device)
        self.class_tokens = tokenizer([args.prompt_zs_template.format(c=c) for c in self.classnames]).to(args.device)
        if len(torch.unique(self.class_tokens, dim=0)) < len(self.classnames):
            raise ValueError(f"{args.class_names}: two class names give the same tokens in "
                             f"{args.prompt_zs_template!r}; make the names distinct")
        with torch.no_grad():
            self.register_buffer("zs_weights", zeroshot_weights(self.tower, tokenizer, self.classnames,
                                                                args.prompt_zs_template, args.prompt_class_chunk,
                                                                args.device), persistent=False)
        logging.info(f"openclip-robust: {self.name} prompt module, {n_ctx} context tokens, "
                     f"{sum(p.numel() for p in self.module.parameters())} parameters, {len(self.classnames)} classes; "
                     f"towers frozen")

    def param_groups(self):
        return [{"params": list(self.module.parameters()), "weight_decay": self.args.wd}]

    def add_data(self, args, data, preprocess_fns, epoch, tokenizer):
        data["train"] = few_shot_loader(args, preprocess_fns[0], epoch, self.class_tokens, self.classnames)
        self._batches = data["train"].dataloader.num_batches
        self._steps = epoch * self._batches
        self._save_dir = getattr(args, "checkpoint_path", None)  # upstream saves there; None without --logs

    def labels(self, texts):
        """Class index of each row of caption tokens: the one class prompt it equals."""
        match = (texts[:, None, :] == self.class_tokens[None]).all(-1)
        if not bool((match.sum(1) == 1).all()):
            raise RuntimeError("a training caption is not one of the class prompts: the train loader is not ours")
        return match.float().argmax(1)

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        self._steps += 1
        m = unwrap(model)
        image_features = None
        if m.training:  # upstream calls model.train() each epoch: this step's forward ran in train mode
            m.eval()
            with torch.no_grad():
                image_features = m.encode_image(images, normalize=True)
        weights = class_weights(self.module, self.tower, self.prompts, self.args.prompt_class_chunk)
        return {"prompt_weights": weights, "prompt_labels": self.labels(texts),
                "prompt_image_features": image_features}

    def forward(self, image_features, text_features, logit_scale, prompt_weights, prompt_labels,
                prompt_image_features=None, output_dict=False, **_):
        f = fp32(image_features if prompt_image_features is None else prompt_image_features)
        # outside autocast: under fp16 the scaled gradient of logits/τ (τ = 0.01) overflows to inf
        with torch.autocast(f.device.type, enabled=False):
            logits = f @ fp32(prompt_weights).T / self.args.prompt_temperature
            losses = {"prompt_ce": F.cross_entropy(logits, prompt_labels)}
            if self.kd:
                losses["prompt_kd"] = self.lam * kd_loss(prompt_weights, self.zs_weights)
        if not output_dict:
            return sum(losses.values())
        losses["log_only"] = {"prompt_acc": (logits.argmax(1) == prompt_labels).float().mean()}
        return losses

    # The module file is written whenever upstream saves a checkpoint (it asks for the plugin state then).
    def get_extra_state(self):
        if self._save_dir and os.path.isdir(self._save_dir) and self.module is not None:
            epoch = -(-self._steps // max(self._batches, 1))
            for name in (f"prompt_module_epoch_{epoch}.pt", "prompt_module.pt"):
                self.module.save(os.path.join(self._save_dir, name), method=self.name, classnames=self.classnames,
                                 epoch=epoch)
        return {"steps": self._steps}

    def set_extra_state(self, state):
        self._steps = state.get("steps", 0)


def kd_loss(weights, zs_weights):
    """1/C Σ_i ‖w_i − w_zs,i‖₂ (Eq. 3), in fp32."""
    return (fp32(weights) - fp32(zs_weights)).norm(dim=-1).mean()


@register_loss("kgcoop")
class KgCoOpLoss(ContCoOpLoss):
    attention = False


@register_loss("coop")
class CoOpLoss(ContCoOpLoss):
    attention = False
    kd = False
