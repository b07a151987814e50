"""Files a user points a run at (checkpoints, weights, prompt modules, caches) load as data, never as code.

Every torch file is read with ``weights_only=True``: torch's restricted unpickler, which refuses a pickle
that asks to import anything. That refusal becomes one line naming the file (``UntrustedFileError``);
nothing is ever retried with ``weights_only=False``. Shards: ``data.shard_format.decode_sample``.
"""
import io
import pickle
import pickletools

import torch

from openclip_robust.errors import UserError


class UntrustedFileError(UserError, ValueError):
    pass


def is_refused_pickle(exc, path=None):
    """Whether `exc` is, or was raised from, torch's weights-only refusal of a pickle that would import code;
    loaders such as timm's re-raise it as another type. torch names the global it refused, unless it stopped
    at an opcode its unpickler lacks (a protocol-4 frame); then the file itself tells: a well-formed pickle
    that torch refuses is refused code, bytes that do not parse as one are damage."""
    while exc is not None:
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            return "GLOBAL" in str(exc) or (path is not None and parses_as_pickle(path))
        exc = exc.__cause__ or exc.__context__
    return False


def parses_as_pickle(path, limit=1 << 20):
    """Whether the file starts with a complete pickle (opcodes read, never executed: pickletools)."""
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(io.BytesIO(f.read(limit))):
                pass
        return True
    except Exception:
        return False


def refusal(path, flag=None):
    where = f"{flag} {path}" if flag else str(path)
    return UntrustedFileError(f"{where}: not a weights-only file (its pickle asks to import code); refusing to load "
                              f"it, as loading could run that code. Give a file of tensors and plain values "
                              f"(torch.save of a state dict, or .safetensors).")


def torch_load(path, flag=None, map_location="cpu", **kw):
    """torch.load(weights_only=True), with the refusal as one line naming `flag` and the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        if is_refused_pickle(e, path):
            raise refusal(path, flag) from None
        raise
