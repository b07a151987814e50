"""worker.py with a stand-in for torch.utils.tensorboard (not a dependency) that records every add_scalar in
OUT_DIR/tensorboard_rank<r>.jsonl, so a test can see what upstream's evaluate() sent to tensorboard.

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


upstream_main.tensorboard = types.SimpleNamespace(SummaryWriter=SummaryWriter)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), run_name="__main__")
