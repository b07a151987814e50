"""Resume checks: a checkpoint continues only the run that wrote it.

Every checkpoint of a robust run records (``checkpoint["plugins"]["robust"]["run"]``) the method, the
settings that shape its state (``RobustLoss.resume_settings``, e.g. DiVE's distance, terms and α), the
embedding width and a fingerprint of the frozen model's weights (the weights the run started from).
``--resume`` compares them with this run's and refuses a mismatch, saying what differs and how to
start fresh on purpose. A run whose frozen model would be a random init (upstream loaded no
pre-trained weights) is refused before training: its regulariser would pull towards noise.

``--resume latest`` with a newest checkpoint that does not load (truncated, corrupt): it is renamed
``*.pt.corrupt`` (so upstream's look-up, which takes the newest ``*.pt``, passes over it) and the run
resumes from the newest one that loads, with a warning. Done in ``validate_args``, before upstream
resolves ``latest``, by rank 0 (upstream also resolves it on rank 0 and broadcasts the path).
``--resume PATH`` gets the same check, as an error. Neither ever unpickles code: a checkpoint whose
pickle would import something (only ``weights_only=False`` would run it) is refused, never loaded.
"""
import glob
import hashlib
import logging
import os
import zipfile

import torch

from openclip_robust.errors import UserError
from openclip_robust.untrusted import is_refused_pickle

RECORD_KEY = "run"
FINGERPRINT_ELEMENTS = 1 << 16  # per tensor, evenly strided: exact bytes, cheap even for billions of weights
RANDOM_INIT_WARNING = "No pretrained weights loaded for model"  # upstream's create_model says this on random init


class ResumeError(UserError, ValueError):
    pass


def weights_fingerprint(model):
    """SHA-256 over each tensor's name, shape and (up to FINGERPRINT_ELEMENTS, evenly strided) fp32 values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_ELEMENTS:
            idx = torch.linspace(0, flat.numel() - 1, FINGERPRINT_ELEMENTS, device=flat.device).long()
            flat = flat[idx]
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def embed_dim(model):
    return getattr(getattr(model, "visual", None), "output_dim", None)


def run_record(args, method, model):
    """What a checkpoint of this run must match to be resumed by it (JSON-like: plain open_clip loads it)."""
    return {"method": method.name, "settings": {d: getattr(args, d) for d in method.resume_settings},
            "embed_dim": embed_dim(model), "frozen_weights": weights_fingerprint(model) if method.needs_frozen else None}


def _fresh(path):
    return (f"To continue {path}, resume with the settings it was trained with; to start a new run on purpose, "
            f"drop --resume (and give a new --name)")


def check_resume(state, record, loss, path):
    """Raise ResumeError unless the checkpoint's plugin `state` was written by a run like this one."""
    saved = state.get(RECORD_KEY)
    if saved is not None:
        if saved["method"] != record["method"]:
            raise ResumeError(f"--resume {path}: the checkpoint was trained with --robust-loss {saved['method']}, this "
                              f"run asks for --robust-loss {record['method']}. {_fresh(path)}.")
        differ = [f"--{k.replace('_', '-')} {saved['settings'].get(k)!r} in the checkpoint, {v!r} now"
                  for k, v in record["settings"].items() if saved["settings"].get(k) != v]
        if saved.get("embed_dim") != record["embed_dim"]:
            differ.append(f"embedding width {saved.get('embed_dim')} in the checkpoint, {record['embed_dim']} now")
        if differ:
            raise ResumeError(f"--resume {path}: settings that shape the loss state differ: {'; '.join(differ)}. "
                              f"{_fresh(path)}.")
        if saved.get("frozen_weights") != record["frozen_weights"]:
            raise ResumeError(
                f"--resume {path}: the frozen model is not the one the checkpoint was trained against (weights "
                f"fingerprint {saved.get('frozen_weights')} then, {record['frozen_weights']} now): this run's "
                f"--model/--pretrained load other weights. Give the --pretrained the run started from. {_fresh(path)}.")
    own, theirs = set(loss.state_dict()), set(state.get("loss", {}))
    if own != theirs:
        raise ResumeError(f"--resume {path}: the checkpoint's loss state ({', '.join(sorted(theirs)) or 'none'}) is not "
                          f"--robust-loss {record['method']}'s ({', '.join(sorted(own)) or 'none'}): it was written by "
                          f"another method. {_fresh(path)}.")


def refuse_plain_train_checkpoint(path, method_name):
    """A training checkpoint without plugin state (upstream calls no plugin then): written without --robust-loss."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not mmap-able (legacy format) or not weights-only: upstream loaded it; nothing to compare
        return
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return
    robust = (checkpoint.get("plugins") or {}).get("robust", {})
    if "loss" not in robust and RECORD_KEY not in robust:  # no state, or retention's alone (plain runs write it)
        raise ResumeError(f"--resume {path}: the checkpoint was trained without --robust-loss, this run asks for "
                          f"--robust-loss {method_name}. {_fresh(path)}; to fine-tune its weights with "
                          f"{method_name}, give them as --pretrained in a new run.")


class RandomInitWatch(logging.Handler):
    """Notes upstream's warning that create_model initialised the model randomly (no pre-trained weights)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = None

    def emit(self, record):
        if RANDOM_INIT_WARNING in record.getMessage():
            self.seen = record.getMessage()
        if logging.getLogger().handlers == [self] and record.levelno >= logging.lastResort.level:
            # alone on the root logger, this handler would silence logging's last resort (stderr): a
            # warning logged before upstream sets up its logging (e.g. a skipped shard) must still be seen
            logging.lastResort.handle(record)

    def start(self):
        logging.getLogger().addHandler(self)
        return self

    def stop(self):
        logging.getLogger().removeHandler(self)


def refuse_random_frozen(args, method, watch):
    if method.needs_frozen and watch.seen:
        raise ResumeError(
            f"--robust-loss {method.name} regularises towards the frozen pre-trained model, but upstream loaded no "
            f"pre-trained weights for --model {args.model} (--pretrained {args.pretrained!r}): the frozen model would "
            f"be a random init. Give --pretrained (a tag or a local weights file).")


# -- checkpoint integrity: --resume latest and --resume PATH ---------------------------------------------
def _checkpoint_problem(path):
    """None if the checkpoint is whole and loads weights-only, else (kind, why): kind "corrupt" (truncated, CRC
    mismatch, unreadable) or "unsafe" (its pickle names code to run, which only weights_only=False would run).
    Never unpickles anything but plain data: a crafted file is refused here, not executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # every member's CRC
            if bad is not None:
                return "corrupt", f"member {bad} fails its CRC check"
        torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
        return None
    except Exception as e:
        if is_refused_pickle(e, path):  # weights_only's refusal: the pickle asks for a global it does not allow
            return "unsafe", "it is not a weights-only checkpoint (its pickle asks to import code)"
        return "corrupt", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"  # any failure: not loadable


def _refuse_unsafe(path, why):
    raise ResumeError(f"--resume: {path}: {why}; refusing to load it (loading could run code). Remove it, or "
                      f"resume from a checkpoint written by open_clip.")


def check_resume_path(args, touches=None):
    """--resume PATH (local file): the same integrity check as --resume latest, as an error before training."""
    if not args.resume or args.resume == "latest" or "://" in args.resume or not os.path.isfile(args.resume):
        return  # latest: fall_back_past_corrupt_latest; remote or missing: upstream's own error
    problem = _checkpoint_problem(args.resume)
    if problem and problem[0] == "unsafe":
        _refuse_unsafe(args.resume, problem[1])
    if problem:
        raise ResumeError(f"--resume {args.resume}: the checkpoint does not load ({problem[1]}): it is truncated or "
                          f"corrupt. Resume from another checkpoint of the run.")


def fall_back_past_corrupt_latest(args, touches=None):
    """--resume latest: move newest checkpoints that do not load aside, so upstream resumes from one that does;
    refuse one whose pickle would run code (that is not damage: someone put it there)."""
    # here: upstream's own ordering of checkpoint names; main.py at the top would load twice under python -m
    from open_clip_train.main import natural_key
    if args.resume != "latest" or not args.name or args.remote_sync or args.save_most_recent:
        return
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) != 0:
        return
    path = os.path.join(args.logs, args.name, "checkpoints")
    checkpoints = sorted(glob.glob((touches.at(path) if touches else path) + "**/*.pt", recursive=True),
                         key=natural_key)  # as upstream lists them
    while checkpoints:
        problem = _checkpoint_problem(touches.at(checkpoints[-1]) if touches else checkpoints[-1])
        if problem is None:
            break
        if problem[0] == "unsafe":
            _refuse_unsafe(checkpoints[-1], problem[1])
        bad = checkpoints.pop()
        os.replace(bad, bad + ".corrupt")
        logging.warning(f"--resume latest: {bad} does not load (truncated or corrupt: {problem[1]}): moved to "
                        f"{bad}.corrupt; resuming from {checkpoints[-1] if checkpoints else 'nothing (a fresh start)'}")
