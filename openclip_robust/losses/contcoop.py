"""Prompt learning on a frozen CLIP: ``contcoop`` (seed 004), with ``coop`` and ``kgcoop`` as its baselines.

L = CE(cos(w_i, f(x)) / τ) + λ·L_kd,  L_kd = 1/C Σ_i ‖w_i − w_zs,i‖₂  (Eq. 2–4), τ = 0.01, λ = 1.
  coop:     context only (no attention), λ = 0;
  kgcoop:   context only + the KD term;
  contcoop: class-conditioned context (attention over the class-name embeddings) + the KD term.
Both towers are frozen (no gradient, eval mode); only the prompt module trains and only it is in the
optimizer. The module file is written beside upstream's checkpoints each time they are saved.

Data: ``add_data`` replaces the train loader with an exactly K-shot, seeded subset read by ``cls`` from
the target shards. It yields (image, tokens of the class prompt "a photo of a {c}.", class index):
upstream's forward runs on the first two, the loss reads the index from the batch. The towers run in
eval mode (set at each epoch start), so the forward's image features are the frozen features.

--accum-freq N: upstream caches the batch-first inputs (features, labels) and calls the loss once per
micro-batch on the whole step's batch; the class weights are computed inside the loss from the module,
so each call's gradient reaches the module in full and is scaled by 1/N (the step's gradient is exact).
"""
import logging
import os

import open_clip
import torch
import torch.nn.functional as F

from openclip_robust.data import shards as sh
from openclip_robust.data.few_shot import few_shot_loader
from openclip_robust.losses.base import RobustLoss, fp32
from openclip_robust.prompts import (ClassPrompts, PromptModule, TextTower, class_weights, token_space, unwrap,
                                     zeroshot_weights)
from openclip_robust.losses.registry import register_loss


def default_classnames_file(train_data):
    return os.path.join(os.path.dirname(sh.shard_list(train_data)[0]), "classnames.txt")


# -- the losses --------------------------------------------------------------------------------------
@register_loss("contcoop")
class ContCoOpLoss(RobustLoss):
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
        self.class_tokens = tokenizer([args.prompt_zs_template.format(c=c) for c in self.classnames])
        self.scale_grads_per_step(self.module.parameters(), args.accum_freq)
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
        self._batches = data["train"].dataloader.num_batches // args.accum_freq  # optimizer steps per epoch
        self._steps = epoch * self._batches
        self._save_dir = getattr(args, "checkpoint_path", None)  # upstream saves there; None without --logs

    def on_train_epoch_start(self, model):
        unwrap(model).eval()  # upstream calls model.train() each epoch; the towers stay frozen features

    def on_optimizer_step(self):
        self._steps += 1

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        return {"prompt_labels": batch[2].to(images.device)}

    def class_weights(self):
        return class_weights(self.module, self.tower, self.prompts, self.args.prompt_class_chunk)

    def forward(self, image_features, text_features, logit_scale, prompt_labels, output_dict=False, **_):
        weights = self.class_weights()
        f = fp32(image_features)
        # outside autocast: under fp16 the scaled gradient of logits/τ (τ = 0.01) overflows to inf
        with torch.autocast(f.device.type, enabled=False):
            logits = f @ fp32(weights).T / self.args.prompt_temperature
            losses = {"prompt_ce": F.cross_entropy(logits, prompt_labels)}
            if self.kd:
                losses["prompt_kd"] = self.lam * kd_loss(weights, self.zs_weights)
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
