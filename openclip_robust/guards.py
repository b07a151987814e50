"""The NaN guard: a non-finite loss stops the run, naming the step and the term, before it trains.

Each call of the loss is checked (a forward hook on the loss module) before upstream's backward:
one small device-to-host copy per call, and under DDP one all-reduce of a flag per term, so that
every rank takes the same decision (one rank raising while the others wait in the next collective
would be a hang). At the last optimizer step of each epoch the weights are checked too, so that
no non-finite checkpoint is written even when an update overflowed behind a finite loss.

``--nonfinite-skip-limit N`` instead skips up to N such steps in the whole run (large runs
sometimes want that): the step's gradients are zeroed (those of earlier micro-batches of
--accum-freq too), so the optimizer sees no gradient from it; AdamW's momentum and weight decay
still apply. The N+1-th is the error.
"""
import logging

import torch
import torch.distributed as dist

from openclip_robust.checks import require
from openclip_robust.distributed import is_distributed
from openclip_robust.errors import UserError

CAUSES = ("usual causes: a learning rate too high (--lr), a loss weight too large, or fp16 overflow "
          "(--precision amp_bf16 or fp32)")


class NonFiniteLossError(UserError, RuntimeError):
    pass


def add_args(group):
    group.add_argument("--nonfinite-skip-limit", type=int, default=0, metavar="N",
                       help="skip up to N training steps whose loss is NaN or inf (their gradients are zeroed) "
                            "before stopping the run; default 0: the first one stops it, naming the step and term.")


def validate_args(args):
    require(args, "nonfinite_skip_limit", low=0)


def any_rank(flags):
    """Elementwise OR of a bool tensor over ranks (the identity in one process)."""
    flags = flags.to(torch.int32)
    if is_distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def _value(t):
    return float(t.detach().float().mean()) if t.numel() else float("nan")


class NonFiniteGuard:
    def __init__(self, args, model, loss):
        self.skip_limit = args.nonfinite_skip_limit
        self.accum_freq = args.accum_freq
        self.skipped = 0
        self.epoch, self.step, self.batches_per_epoch = 0, 0, None
        self.skipping = False  # this step's gradients are being zeroed
        self.model = model
        self.params = [p for p in [*model.parameters(), *loss.parameters()] if p.requires_grad]
        loss.register_forward_hook(self._check_loss)
        if self.skip_limit > 0:
            for p in self.params:
                p.register_hook(self._zero_if_skipping)

    def where(self):
        where = f"step {self.step} (epoch {self.epoch}"
        if self.batches_per_epoch:
            where += f", batch {self.step - self.epoch * self.batches_per_epoch + 1} of {self.batches_per_epoch}"
        return where + ")"

    # -- hooks, called by the plugin ---------------------------------------------------------------
    def on_train_epoch_start(self, epoch, data):
        self.epoch = epoch
        loader = data["train"].dataloader
        self.batches_per_epoch = loader.num_batches // self.accum_freq
        self.step = epoch * self.batches_per_epoch

    def on_optimizer_step(self, step):
        self.skipping = False
        self.step = step + 1
        if self.batches_per_epoch and self.step % self.batches_per_epoch == 0:
            self.check_weights(step)

    # -- checks ------------------------------------------------------------------------------------
    def _check_loss(self, module, inputs, output):
        terms = output if isinstance(output, dict) else {"loss": output}
        terms = {k: v for k, v in terms.items() if k != "log_only" and torch.is_tensor(v)}
        if not terms:
            return None
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()])
        bad = any_rank(flags).tolist()
        if not any(bad):
            return None
        values = ", ".join(f"{k}={_value(v):.4g}" for k, v in terms.items())
        names = ", ".join(k for k, b in zip(terms, bad) if b)
        if self.skipped >= self.skip_limit:
            limit = (f"; {self.skipped} earlier step(s) were skipped, --nonfinite-skip-limit {self.skip_limit}"
                     if self.skip_limit else "; --nonfinite-skip-limit N would skip up to N such steps")
            raise NonFiniteLossError(
                f"openclip-robust: non-finite loss at {self.where()}: {names} (this rank: {values}); the run is "
                f"stopped before this step's update and before any checkpoint holds it{limit}. {CAUSES}.")
        if not self.skipping:
            self.skipped += 1
            self.skipping = True
            for p in self.params:  # earlier micro-batches of --accum-freq: their gradients go too
                if p.grad is not None:
                    p.grad.zero_()
            logging.warning(f"openclip-robust: non-finite loss at {self.where()}: {names} ({values}); step skipped "
                            f"({self.skipped} of at most {self.skip_limit})")
        return None

    def _zero_if_skipping(self, grad):
        return torch.zeros_like(grad) if self.skipping else grad

    def check_weights(self, step):
        bad = torch.stack([~torch.isfinite(p.detach()).all() for p in self.params]) if self.params else None
        if bad is None or not any_rank(bad.any()[None]).item():
            return
        names = [n for n, p in self.model.named_parameters() if not torch.isfinite(p.detach()).all()]
        raise NonFiniteLossError(
            f"openclip-robust: non-finite weights after step {step} (epoch {self.epoch}): "
            f"{', '.join(names[:5]) or 'the loss parameters'}{' ...' if len(names) > 5 else ''}; the run is stopped "
            f"before their checkpoint is written. {CAUSES}.")
