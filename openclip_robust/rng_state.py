"""The random-number generators that shape training, saved with the plugin's state and restored on resume.

A straight run's epoch e draws its augmentation (torchvision's random transforms, through torch's global
generator), the loader's worker seeds (drawn from torch's generator when an epoch's iterator is created)
and any python/numpy draws from generators whose state is the history of epochs 0..e-1. A resumed run
starts them from `random_seed(seed, rank)` instead; restoring the states saved at the end of epoch e-1
makes its epoch e draw the same numbers. Stored as tensors, ints and lists only, so the checkpoint stays
loadable with ``torch.load(weights_only=True)``. See docs/checkpoints-distributed.md for what this does and
does not make identical.
"""
import logging
import random

import numpy as np
import torch


def capture():
    """This process's generator states: torch (CPU and, once initialised, every CUDA device), python, numpy."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state):
    """Set this process's generators to `state` (from `capture`); a CUDA state saved on another number of
    devices is skipped with a warning (the CPU-side states are still restored)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logging.warning(f"--resume: the checkpoint's CUDA generator states are of {len(cuda)} devices, this "
                            f"process sees {torch.cuda.device_count()}: CUDA draws will differ from a straight run")
