"""One benchmark arm: upstream's training step for one method, built once and stepped on demand.

`build_arm` does what open_clip_train.main does before training (its parse_args with the plugin's
flags and checks, model, the plugin's hooks, upstream's AdamW groups, get_data + the plugin's
add_data, the plugin's loss) and `Arm.step` runs one step as train_one_epoch's accum-freq-1 branch
does (data, zero_grad, autocast forward, step_inputs, loss, backward, optimizer step, the plugin's
on_optimizer_step, the logit-scale clamp), without its logging. `--ref-backward separate` runs
through the plugin's `before_forward` hook, as in the loop. One step shape exists only here:
`concat_forward` (one student call on target + reference).
"""
import math
import time

import torch
from open_clip import create_loss, create_model_and_transforms, get_input_dtype, get_tokenizer
from open_clip_train.data import get_data
from open_clip_train.distributed import init_distributed_device
from open_clip_train.main import random_seed
from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager
from open_clip_train.precision import get_autocast
from open_clip_train.train import backward as upstream_backward
from torch import optim

from openclip_robust.losses.base import frozen_reference_features
from openclip_robust.plugin import RobustPlugin

STEP_SHAPES = ("joint", "concat")


def upstream_optimizer(args, model, plugin_groups):
    """main()'s AdamW: no weight decay on gains, biases and logit_scale; the plugin's groups appended."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.},
                        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.wd},
                        *plugin_groups], lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def concat_forward(model, frozen, loss, images, texts, reference, autocast):
    """DiVE's loss with one student call on cat(target, reference), split after; fp32 runs only (under
    autocast the reference half would lose --diff-precision fp32). Returns the total loss."""
    b = len(images)
    with autocast():
        out = model(torch.cat([images, reference.images]), torch.cat([texts, reference.texts]))
        pre = frozen_reference_features(frozen, reference, fp32_forward=loss.precise)
        inputs = {"ref_image_features": out["image_features"][b:], "ref_text_features": out["text_features"][b:],
                  "ref_pre_image_features": pre["image_features"], "ref_pre_text_features": pre["text_features"]}
        losses = loss(out["image_features"][:b], out["text_features"][:b], out["logit_scale"], output_dict=True,
                      **inputs)
        losses.pop("log_only", None)
        return sum(losses.values())


class Arm:
    """A built arm; `step()` returns (step_s, data_s, ref_data_s) of one training step."""

    def __init__(self, name, args, model, optimizer, scaler, loss, plugins, plugin, data, shape):
        self.name, self.args, self.model, self.optimizer, self.scaler = name, args, model, optimizer, scaler
        self.loss, self.plugins, self.plugin, self.data, self.shape = loss, plugins, plugin, data, shape
        self.device = torch.device(args.device)
        self.autocast = get_autocast(args.precision, device_type=self.device.type)
        self.input_dtype = get_input_dtype(args.precision)
        self.steps, self.epoch = 0, 0
        self.batches = iter(data["train"].dataloader)

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # one epoch of --train-num-samples used up: start the next
            self.epoch += 1
            self.data["train"].set_epoch(self.epoch)
            self.batches = iter(self.data["train"].dataloader)
            return next(self.batches)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self):
        args, model = self.args, self.model
        self.sync()
        start = time.perf_counter()
        batch = self.next_batch()
        images = batch[0].to(device=self.device, dtype=self.input_dtype, non_blocking=True)
        texts = batch[1].to(device=self.device, non_blocking=True)
        data_s = time.perf_counter() - start
        stream = getattr(self.plugin, "reference", None)
        ref_s = stream.last_wait_s if stream is not None else 0.0
        self.optimizer.zero_grad()
        backward = lambda x: upstream_backward(x, self.scaler)  # noqa: E731
        if self.shape == "joint":
            # as the patched loop: --ref-backward separate backwards the reference terms here
            self.plugins.call("before_forward", args=args, model=model, batch=batch, images=images, texts=texts,
                              backward=backward)
            with self.autocast():
                out = model(images, texts)
                out.update(self.plugins.merged("step_inputs", args=args, model=model, batch=batch, images=images,
                                               texts=texts))
                losses = self.loss(**out, output_dict=True)
                losses.pop("log_only", None)
                total = sum(losses.values())
            backward(total)
        else:
            reference = batch[-1].to(self.device, self.input_dtype)
            backward(concat_forward(model, self.plugin.frozen, self.loss, images, texts, reference, self.autocast))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.plugins.call("on_optimizer_step", args=args, model=model, step=self.steps)
        self.steps += 1
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        self.sync()
        return time.perf_counter() - start, data_s, ref_s


def build_arm(name, argv, shape="joint", grad_checkpointing=False):
    """main()'s set-up for `argv` (upstream flags + the plugin's), in this process."""
    if shape not in STEP_SHAPES:
        raise ValueError(f"step shape {shape!r}: one of {', '.join(STEP_SHAPES)}")
    plugin = RobustPlugin()
    plugins = PluginManager({"robust": plugin})
    args = parse_args(list(argv), plugins)
    if shape != "joint" and args.robust_loss != "dive":
        raise ValueError(f"{name}: the {shape} step shape is DiVE's (--robust-loss dive)")
    if shape == "concat" and args.precision != "fp32":
        raise ValueError(f"{name}: the concatenated forward is measured in fp32 only (--precision fp32)")
    device = init_distributed_device(args)
    args.distill = False  # main() derives these from other flags
    args.wandb = args.tensorboard = args.save_logs = False
    random_seed(args.seed, 0)
    model, preprocess_train, preprocess_val = create_model_and_transforms(
        args.model, args.pretrained, precision=args.precision, device=device, output_dict=True)
    plugins.call("on_model_created", args=args, model=model, device=device)
    if grad_checkpointing:
        model.set_grad_checkpointing()
    optimizer = upstream_optimizer(args, model, sum(plugins.call("param_groups", args=args, model=model), []))
    scaler = torch.amp.GradScaler(device=device.type) if args.precision == "amp" and device.type == "cuda" else None
    tokenizer = get_tokenizer(args.model)
    data = get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=tokenizer)
    plugins.call("add_data", args=args, data=data, preprocess_fns=(preprocess_train, preprocess_val), epoch=0,
                 tokenizer=tokenizer)
    loss = next((x for x in plugins.call("create_loss", args=args) if x is not None), None) or create_loss(args)
    model.train()
    data["train"].set_epoch(0)
    plugins.call("on_train_epoch_start", args=args, model=model, data=data, epoch=0)
    return Arm(name, args, model, optimizer, scaler, loss, plugins, plugin, data, shape)
