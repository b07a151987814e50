"""The adapter for upstream main's training-task API (open_clip 4.x): the only module that knows ``TrainingTask``.

On main the loop calls ``task(batch) -> (losses, report)``. With ``--robust-loss`` the patched ``main()`` asks
the plugins for the task (``create_task`` hook), and gets a :class:`RobustTask`: the model is its
``trainable_module`` (the only part DDP / FSDP2 wrap and the checkpoint saves as ``state_dict``); the frozen
model and the method (its teachers, prompt modules, DiVE's m) sit beside it, like ``DistillCLIPTask``'s
teacher. The reference batch rides in the loader's batch (``data.reference.WithReference`` puts it under
``REFERENCE_KEY``, as on 3.x it is the batch's last field), so every micro-step of --accum-freq and a compiled
step see it as an input, and upstream's data time includes it.
The method code is shared with the 3.x line: this adapter calls :class:`RobustPlugin` and the
``RobustLoss`` contract (``step_inputs`` -> ``forward`` -> ``on_optimizer_step``) as they are.
"""
from open_clip.task import CLIPTask

from openclip_robust.data.reference import REFERENCE_KEY
from openclip_robust.plugin import RobustPlugin

FIELDS_KEY = "robust_fields"  # a plugin loader's fields after (images, texts), e.g. the sample keys
# models whose task is not CLIPTask-like (image, text -> features): upstream builds their own tasks
UNSUPPORTED_MODELS = ("coca", "genlip", "genlap", "clap")


class DictBatches:
    """A plugin's train loader, seen as main's loop wants it: each (images, texts, *fields) batch as a dict."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, dict):
                yield batch
            else:
                yield {"image": batch[0], "text": batch[1], FIELDS_KEY: tuple(batch[2:])}

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # num_batches, num_samples, ...
        return getattr(self.loader, name)


class RobustTask(CLIPTask):
    """CLIP training with a robust method's loss: ``trainable_module`` is the fine-tuned model only."""

    def __init__(self, model, loss, frozen, *, rank=0, world_size=1):
        super().__init__(model, loss=loss, rank=rank, world_size=world_size)
        self.frozen = frozen  # None when a teacher cache replaces it
        # the method's modules keep the train/eval modes they were built with (teachers in eval), as on 3.x,
        # where the loop never calls .train() on them
        self._fixed_modes = [(m, m.training) for part in (loss, frozen) if part is not None for m in part.modules()]

    def train(self, mode=True):
        super().train(mode)
        for module, training in self._fixed_modes:
            module.train(training)
        return self

    def _step_inputs(self, batch):
        images, texts = batch["image"], batch["text"]
        fields = (images, texts, *batch.get(FIELDS_KEY, ()))  # the loader's batch as the 3.x loop yields it
        reference = batch.get(REFERENCE_KEY)  # prepare_batch leaves it on the host: it is no tensor
        if reference is not None:
            reference = reference.to(images.device, images.dtype)
        return self.loss.step_inputs(self.trainable_module, self.frozen, images, texts, reference, batch=fields)

    @staticmethod
    def _total(losses):
        """upstream's loop logs every entry: the terms, "loss" (their sum, which it backpropagates), log-only values."""
        log_only = losses.pop("log_only", {})
        losses["loss"] = sum(losses.values())
        losses.update(log_only)
        return losses

    def features_forward(self, batch):
        out = self.trainable_module(image=batch["image"], text=batch["text"])
        out.update(self._step_inputs(batch))  # batch-first: cached and concatenated like the features
        return out

    def training_forward(self, batch):
        model_out = self.features_forward(batch)
        return self._total(self.loss(**model_out, output_dict=True)), self._report(model_out)

    def compute_accum_loss(self, inputs, inputs_no_accum, accum_batches):
        return self._total(self.loss(**inputs, **inputs_no_accum, output_dict=True)), self._report(inputs_no_accum)


class RobustTaskPlugin:
    """The plugin on main's hook spec: :class:`RobustPlugin` for flags, model, data and state, plus the task."""

    def __init__(self):
        self._robust = RobustPlugin()
        self._original_train = None

    def add_args(self, parser):
        self._robust.add_args(parser)

    def validate_args(self, args):
        self._robust.validate_args(args)
        if args.robust_loss is None:
            return
        if getattr(args, "distill_model", None):
            raise ValueError("--robust-loss and --distill-model each replace the training task: use one")
        if args.ref_backward == "separate":  # a backward inside the task's forward would break compiled steps
            raise ValueError("--ref-backward separate runs on the 3.x loop (release, v3) only; on main use the "
                             "default (joint) or --grad-checkpointing to save memory")
        model = args.model.lower()
        if any(name in model for name in UNSUPPORTED_MODELS) or getattr(args, "use_naflex", False):
            raise ValueError(f"--robust-loss runs image-text CLIP models (CLIPTask's inputs); --model {args.model} "
                             f"has its own task upstream")

    def on_model_created(self, args, model, device):
        self._robust.on_model_created(args=args, model=model, device=device)

    def create_task(self, args, model, dist_model, naflex_data_config):
        if self._robust.loss is None:
            return None  # upstream's own chain
        return RobustTask(model, self._robust.loss, self._robust.frozen, rank=args.rank, world_size=args.world_size)

    def param_groups(self, args, model):
        return self._robust.param_groups(args=args, model=model)

    def add_data(self, args, data, preprocess_fns, epoch, tokenizer):
        before = data.get("train")
        self._robust.add_data(args=args, data=data, preprocess_fns=preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if data.get("train") is not before:  # the method's own loader may yield tuples
            data["train"].dataloader = DictBatches(data["train"].dataloader)

    def on_train_epoch_start(self, args, task, data, epoch):
        self._robust.on_train_epoch_start(args=args, model=task.trainable_module, data=data, epoch=epoch)

    def on_optimizer_step(self, args, task, step):
        self._robust.on_optimizer_step(args=args, model=task, step=step)

    def eval_metrics(self, args, task, data, epoch, tokenizer):
        return self._robust.eval_metrics(args=args, model=task.trainable_module, data=data, epoch=epoch,
                                         tokenizer=tokenizer)

    def state_dict(self):
        return self._robust.state_dict()

    def load_state_dict(self, state):
        self._robust.load_state_dict(state=state)
