"""The open_clip_train plugin (entry point ``open_clip_train.plugins: robust``).

Every hook is a no-op unless ``--robust-loss`` is given, so plain upstream runs are unchanged; the one exception
is ``--retention-*`` (retention.py), which any run may add to have its drift from the pre-trained model logged.
The hook spec lives upstream, in the patched ``open_clip_train/plugins.py``.
"""
import contextlib
import logging

import torch

from open_clip import get_input_dtype
from open_clip_train.distributed import is_master, is_using_distributed
from open_clip_train.precision import get_autocast

from openclip_robust import flags, guards, resume, retention, rng_state
from openclip_robust.errors import install_excepthook
from openclip_robust.storage import bounded
from openclip_robust.teachers.frozen import check_upstream_bn_freeze, exact_half_dtype, freeze_bn_stats, frozen_copy
from openclip_robust.data.image_only import is_webdataset
from openclip_robust.data.reference import (ReferenceStream, WithReference, check_sources_exist, readable_shards,
                                            source_weights)
from openclip_robust.data.run_probe import check_run_data
from openclip_robust.data import probe
from openclip_robust import precise
from openclip_robust.losses import get_loss_class, loss_names
from openclip_robust.data.prompt_redraw import redraw_prompts
from openclip_robust.teachers import cache as teacher_cache

def open_teacher_cache(args, preprocess, tokenizer, weights_hash, ref_urls):
    """Open --ref-teacher-cache and refuse it unless this run would compute the same embeddings."""
    teacher_cache.assert_deterministic(preprocess)
    cache = teacher_cache.TeacherCache(args.ref_teacher_cache)
    current = teacher_cache.provenance(
        args.model, None, preprocess, tokenizer, precise.frozen_precision(args.precision, args.diff_precision),
        args.force_quick_gelu, args.force_image_size,
        args.force_context_length, weights_hash=weights_hash)
    cache.check(current, ref_urls)
    logging.info(f"openclip-robust: frozen reference embeddings from {args.ref_teacher_cache} ({len(cache)} samples, "
                 f"{cache.manifest['dtype']}, read per shard by the reference loader's workers)")
    return cache


class RobustPlugin:
    def __init__(self):
        self.method = None   # the RobustLoss class chosen by --robust-loss
        self.frozen = None   # frozen pre-trained model
        self.loss = None
        self.guard = None    # guards.NonFiniteGuard: a non-finite loss stops the run
        self.args = None
        self.record = None   # resume.run_record: what a checkpoint must match to be resumed by this run
        self._init_watch = resume.RandomInitWatch()  # upstream's "initialized randomly" warning
        self._resumed_state = False  # load_state_dict was called (the checkpoint held plugin state)
        self.reference = None
        self.ref_urls = None
        self.ref_weights = None     # per-shard weights of --ref-data-upsampling-factors
        self.teacher_cache = None   # --ref-teacher-cache: TeacherCache
        self.weights_hash = None    # of the model as loaded, checked against the cache's record
        self._defaults = {}
        self.retention = retention.RetentionMonitor()  # --retention-*: with or without --robust-loss
        self._frozen_exact = True  # the frozen copy holds the weights as loaded (not rounded to half)
        self._owners, self._actions = {}, []  # method name -> the flags it added; the plugin's flags

    # -- arguments -------------------------------------------------------------------------------
    def add_args(self, parser):
        group = parser.add_argument_group(
            "openclip-robust", "robust fine-tuning (plugin); without --robust-loss nothing changes")
        before = {a.dest for a in parser._actions}
        group.add_argument("--robust-loss", type=str, default=None, choices=loss_names(),
                           help="robust fine-tuning method.")
        group.add_argument("--ref-data", type=str, default=None,
                           help="reference image-caption webdataset shards (braces and '::' as in --train-data).")
        group.add_argument("--ref-batch-size", type=int, default=None,
                           help="reference batch size B' per GPU (default: --batch-size).")
        group.add_argument("--ref-data-upsampling-factors", type=str, default=None, metavar="F1::F2",
                           help="weights of the '::'-joined --ref-data sources, one per source, as upstream's "
                                "--train-data-upsampling-factors (each shard of a source drawn with its factor); "
                                "default: every shard alike.")
        group.add_argument("--ref-workers", type=int, default=None,
                           help="data workers for the reference stream (default: --workers x B'/B, at least 1: "
                                "decoding B' reference images a step takes B'/B times the target's work).")
        group.add_argument("--ref-backward", choices=("joint", "separate"), default="joint",
                           help="joint: one backward of the whole loss (upstream's); separate (dive, snd; "
                                "--accum-freq 1; 3.x line): the reference branch's terms are computed and "
                                "backwarded before the target forward, so its activations are freed first "
                                "(less peak memory, the same gradients).")
        group.add_argument("--ref-teacher-cache", type=str, default=None, metavar="DIR",
                           help="frozen-model embeddings of --ref-data from `openclip-robust cache-teacher`: read "
                                "them instead of running the frozen forward (dive, snd). Refused if its model, "
                                "weights, preprocessing or tokenizer differ from this run's.")
        group.add_argument("--robust-bn", choices=("frozen", "train"), default="frozen",
                           help="BatchNorm statistics of the fine-tuned model: frozen (eval mode) or train.")
        group.add_argument("--prompt-redraw", choices=("auto", "off"), default="auto",
                           help="auto: when classnames.txt and templates.txt lie beside --train-data (as "
                                "`openclip-robust make-target-shards` writes them), each caption gets a freshly "
                                "drawn template every time it is read (FLYP); off: captions as stored.")
        precise.add_args(group)
        guards.add_args(group)
        probe.add_args(group)
        retention.add_args(parser)
        self._owners = flags.add_method_args(group)
        self._actions = list(group._group_actions)
        self._defaults = {a.dest: a.default for a in parser._actions if a.dest not in before}

    def validate_args(self, args):
        self.retention.validate_args(args)
        if args.robust_loss is None:  # retention metrics are the one thing a plain upstream run may ask for
            changed = [f"--{d.replace('_', '-')}" for d, v in self._defaults.items()
                       if getattr(args, d) != v and d not in retention.DESTS]
            if changed:
                raise ValueError(f"{', '.join(changed)} given without --robust-loss: "
                                 f"add --robust-loss {{{','.join(loss_names())}}} or drop them")
            return
        self.method = get_loss_class(args.robust_loss)
        install_excepthook(debug=getattr(args, "debug", False))  # errors the user can fix: one line, exit 2
        flags.check_finite(args, self._actions)
        flags.check_unused(args, self.method, self._owners, self._defaults)
        guards.validate_args(args)
        probe.validate_args(args)
        bounded(lambda t: resume.fall_back_past_corrupt_latest(args, t), args.data_probe_timeout, "--resume")
        bounded(lambda t: resume.check_resume_path(args, t), args.data_probe_timeout, "--resume", args.resume)
        if self.method.needs_frozen:
            self._init_watch.start()
        if args.ref_batch_size is None:
            args.ref_batch_size = args.batch_size
        if args.ref_workers is None:
            args.ref_workers = max(1, round(args.workers * args.ref_batch_size / args.batch_size))
        if args.ref_batch_size < 1 or args.ref_workers < 0:
            raise ValueError("--ref-batch-size must be >= 1 and --ref-workers >= 0")
        bounded(lambda t: self.method.validate_args(args), args.data_probe_timeout,  # reads files its flags name
                f"--robust-loss {args.robust_loss}", "a file its flags name (weights, cache, class names)")
        if args.ref_backward == "separate" and not (self.method.separable_reference and args.accum_freq == 1):
            raise ValueError(f"--ref-backward separate: needs a method whose reference terms are separable (dive, "
                             f"snd; not {args.robust_loss}) and --accum-freq 1 (not {args.accum_freq}); drop it")
        if self.method.needs_reference:
            if not args.ref_data:
                raise ValueError(f"--robust-loss {args.robust_loss} needs --ref-data: webdataset shards "
                                 f"of reference image-caption pairs (e.g. CC3M in img2dataset format)")
            if not is_using_distributed():  # one process: bad shards are a command-line error
                self.ref_urls, self.ref_weights = readable_shards(args.ref_data,
                                                                  factors=args.ref_data_upsampling_factors,
                                                                  timeout_s=args.data_probe_timeout)
            else:  # the ranks share the scan once they can talk (add_data); the factors are checked now
                source_weights(args.ref_data, args.ref_data_upsampling_factors)
        if args.ref_teacher_cache:
            if not self.method.frozen_on_reference_only:
                raise ValueError(f"--ref-teacher-cache: --robust-loss {args.robust_loss} runs no frozen model on "
                                 f"reference data only, so a cache cannot replace it; drop the flag")
            bounded(lambda t: teacher_cache.read_manifest(t.at(args.ref_teacher_cache)),  # fails early if DIR is
                    args.data_probe_timeout, "--ref-teacher-cache")                       # not a cache
        if self.method.target_samples and args.train_data and is_webdataset(args):  # upstream's loader reads it
            check_sources_exist(args.train_data, "--train-data", args.data_probe_timeout)

    # -- model, loss, data -----------------------------------------------------------------------
    # The loss is built with the model (not in create_loss) so that its own parameters can join the
    # optimizer and its state can be restored on resume; both happen before upstream's create_loss.
    def on_model_created(self, args, model, device):
        if self.method is None:
            return
        self._init_watch.stop()
        if not getattr(args, "torchcompile", False):  # upstream's setup_logging set torch's loggers to INFO: its
            logging.getLogger("torch").setLevel(logging.WARNING)  # exit-time compile metrics would bury an error
            for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]:
                logging.getLogger(name).setLevel(logging.NOTSET)  # inherit torch's WARNING
        resume.refuse_random_frozen(args, self.method, self._init_watch)
        check_upstream_bn_freeze(args, model)
        self.args, self.record = args, resume.run_record(args, self.method, model)
        if args.ref_teacher_cache:
            self.weights_hash = teacher_cache.weights_sha256(model)
        if self.method.needs_frozen and not (args.ref_teacher_cache and self.method.frozen_on_reference_only):
            half = exact_half_dtype(args.precision, args.diff_precision, getattr(args, "fsdp", False))
            self.frozen = frozen_copy(model, half)
            self._frozen_exact = half is None
            if half is not None:
                logging.info(f"openclip-robust: the frozen model's matmul weights are held in {half} (exact under "
                             f"--precision {args.precision} with --diff-precision autocast)")
        self.loss = self.method(args)
        self.loss.setup(args, model)
        self.guard = guards.NonFiniteGuard(args, model, self.loss)

    def param_groups(self, args, model):
        return self.loss.param_groups() if self.loss is not None else []

    def create_loss(self, args):
        return self.loss

    def add_data(self, args, data, preprocess_fns, epoch, tokenizer):
        if "train" in data:
            self.retention.setup(args, preprocess_fns[1], tokenizer)
        if self.loss is None or "train" not in data:
            return
        if args.resume and not self._resumed_state:
            resume.refuse_plain_train_checkpoint(args.resume, self.method.name)
        if args.prompt_redraw == "auto":
            redraw_prompts(args, data, preprocess_fns, epoch, tokenizer)
        if self.method.needs_reference and self.ref_urls is None:
            self.ref_urls, self.ref_weights = readable_shards(args.ref_data, factors=args.ref_data_upsampling_factors,
                                                              timeout_s=args.data_probe_timeout)
        if args.ref_teacher_cache and self.teacher_cache is None:
            self.teacher_cache = bounded(lambda t: open_teacher_cache(args, preprocess_fns[1], tokenizer,
                                                                      self.weights_hash, self.ref_urls),
                                         args.data_probe_timeout, "--ref-teacher-cache", args.ref_teacher_cache)
        self.loss.add_data(args, data, preprocess_fns, epoch, tokenizer)
        check_run_data(args, self.method, self.ref_urls, preprocess_fns, tokenizer)
        if self.method.needs_reference:  # last: it wraps whichever train loader the steps above left
            self.reference = ReferenceStream(args, self.ref_urls, preprocess_fns[1], tokenizer, self.ref_weights,
                                             teacher_cache=self.teacher_cache)
            train = data["train"]
            train.dataloader = WithReference(train.dataloader, self.reference,
                                             args.log_every_n_steps if is_master(args) else 0)

    # -- training step ---------------------------------------------------------------------------
    def on_train_epoch_start(self, args, model, data, epoch):
        # the pre-trained side of the retention metrics, before the first step: from a frozen copy holding the
        # weights as loaded, else from the model itself (half-rounded frozen weights only when resumed)
        exact = self.frozen is not None and (self._frozen_exact or args.resume)
        self.retention.ensure_pretrained(args, model, self.frozen if exact else None)
        if self.loss is None:
            return
        if getattr(self, "_rng_at_epoch_start", None) is not None:  # the first epoch of a resumed run
            rng_state.restore(self._rng_at_epoch_start)
            self._rng_at_epoch_start = None
            logging.info("openclip-robust: restored the random generators' states from the checkpoint")
        if args.robust_bn == "frozen":
            freeze_bn_stats(model)
        self.guard.on_train_epoch_start(epoch, data)
        if self.reference is not None:
            self.reference.set_epoch(epoch)
        self.loss.on_train_epoch_start(model)

    def _loss_inputs(self, args, model, batch, images, texts):
        reference = None
        if self.reference is not None:  # WithReference appended it to the loader's batch
            batch, reference = batch[:-1], batch[-1].to(torch.device(args.device), get_input_dtype(args.precision))
        return self.loss.step_inputs(model, self.frozen, images, texts, reference, batch=batch)

    def before_forward(self, args, model, batch, images, texts, backward):
        """--ref-backward separate: the reference terms' forward and backward, before the target's forward."""
        if self.loss is None or args.ref_backward != "separate":
            return
        # DDP: gradients are reduced once, in the loop's backward (also those of parameters only one branch reaches)
        with getattr(model, "no_sync", contextlib.nullcontext)():
            with get_autocast(args.precision, device_type=torch.device(args.device).type)():
                terms, log_only = self.loss.regularizer(logit_scale=None,
                                                        **self._loss_inputs(args, model, batch, images, texts))
            backward(sum(terms.values()))
        self.loss.precomputed = ({k: v.detach() for k, v in terms.items()}, {k: v.detach() for k, v in log_only.items()})

    def step_inputs(self, args, model, batch, images, texts):
        if self.loss is None or args.ref_backward == "separate":  # separate: before_forward did it
            return {}
        return self._loss_inputs(args, model, batch, images, texts)

    def on_optimizer_step(self, args, model, step):
        if self.loss is not None:
            self.loss.on_optimizer_step()
            self.guard.on_optimizer_step(step)

    def eval_metrics(self, args, model, data, epoch, tokenizer):
        return self.retention.evaluate(args, model, data, epoch)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self):
        retained = self.retention.state_dict()  # the pre-trained side of --retention-*, also without a method
        state = {"retention": retained} if retained else {}
        if self.loss is not None:
            # the generators' states at the end of the epoch (upstream saves on rank 0: its states; see rng_state)
            state.update({"loss": self.loss.state_dict(), resume.RECORD_KEY: self.record,
                          "rng": {**rng_state.capture(), "rank": self.args.rank, "world_size": self.args.world_size}})
        return state

    def load_state_dict(self, state):
        if "retention" in state:
            self.retention.load_state_dict(state["retention"])
        if "loss" not in state and resume.RECORD_KEY not in state:
            return  # retention only: a run without --robust-loss wrote it (add_data refuses it for a method)
        if self.loss is None:
            logging.warning("--resume: the checkpoint holds openclip-robust loss state (e.g. DiVE's m) but "
                            "no --robust-loss is given: that state is dropped")
            return
        resume.check_resume(state, self.record, self.loss, self.args.resume)
        self._resumed_state = True
        self.loss.load_state_dict(state.get("loss", {}))
        logging.info("openclip-robust: restored loss state from the checkpoint")
        rng = state.get("rng")  # absent in checkpoints written before it was saved: nothing to restore
        if rng is not None and rng["rank"] == self.args.rank and rng["world_size"] == self.args.world_size:
            # restored when the resumed epoch starts (on_train_epoch_start), where the straight run went on from
            # this state: the data set-up between here and there (probes) draws from the generators too
            self._rng_at_epoch_start = rng
