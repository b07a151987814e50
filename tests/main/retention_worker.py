"""worker.py with a stand-in for torch.utils.tensorboard (not a dependency) that records every add_scalar in
OUT_DIR/tensorboard_rank<r>.jsonl, so a test can see what upstream's evaluate() sent to tensorboard; each call of
upstream's evaluate() by main() is counted in OUT_DIR/evaluate_calls_rank<r>.txt.

    python tests/main/retention_worker.py OUT_DIR <open_clip_train.main arguments>
"""
import json
import os
import runpy
import sys
import types

import open_clip_train.main as upstream_main


class SummaryWriter:
    def __init__(self, path):
        self.path = os.path.join(sys.argv[1], f"tensorboard_rank{os.environ.get('RANK', 0)}.jsonl")

    def add_scalar(self, name, value, step):
        with open(self.path, "a") as f:
            f.write(json.dumps([name, value, step]) + "\n")

    def close(self):
        pass


def counted(evaluate):
    def call(*args, **kwargs):
        with open(os.path.join(sys.argv[1], f"evaluate_calls_rank{os.environ.get('RANK', 0)}.txt"), "a") as f:
            f.write(f"{args[2]}\n")  # the epoch
        return evaluate(*args, **kwargs)
    return call


upstream_main.tensorboard = types.SimpleNamespace(SummaryWriter=SummaryWriter)
upstream_main.evaluate = counted(upstream_main.evaluate)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), run_name="__main__")
