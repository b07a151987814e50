"""Run open_clip_train.main in upstream main's venv (one process, or one rank under torchrun), then write
what the tests check beyond the logs: this rank's plugin state and how the training task was built.

    python tests/main/worker.py OUT_DIR <open_clip_train.main arguments>
"""
import json
import os
import sys

import torch
from open_clip_train import plugins as plugin_api
from open_clip_train.main import main

from openclip_robust import task as adapter

torch.set_flush_denormal(True)  # CPU steps run 3-4x slower without it
seen = {}
discover = plugin_api.PluginManager.discover.__func__
create_task = adapter.RobustTaskPlugin.create_task


def recording_discover(cls, *args, **kwargs):
    seen["plugins"] = discover(cls, *args, **kwargs)
    return seen["plugins"]


def recording_create_task(self, **kwargs):
    seen["task"] = create_task(self, **kwargs)
    return seen["task"]


plugin_api.PluginManager.discover = classmethod(recording_discover)
adapter.RobustTaskPlugin.create_task = recording_create_task


def describe(task):
    if task is None:
        return {"task": None}
    inside = {id(m) for m in task.trainable_module.modules()}
    frozen_params = list(task.frozen.parameters()) if task.frozen is not None else []
    return {
        "task": type(task).__name__,
        "trainable": type(task.trainable_module).__name__,
        "fsdp": task._fsdp_enabled,
        "frozen_outside": task.frozen is None or id(task.frozen) not in inside,
        "loss_outside": id(task.loss) not in inside,
        "frozen_plain_tensors": all(type(p) is torch.nn.Parameter and not p.requires_grad for p in frozen_params),
    }


if __name__ == "__main__":
    out = sys.argv[1]
    result = main(sys.argv[2:])
    rank = int(os.environ.get("RANK", 0))
    robust = seen["plugins"].plugins["robust"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "result": result, **describe(seen.get("task"))}, f)
    torch.save(robust.state_dict(), os.path.join(out, f"state_rank{rank}.pt"))
