"""One rank of the retention monitor on the toy CLIP (torchrun, gloo), or the whole job in one process.

    python dist_retention_worker.py OUT PAIRS SUITE     (FAIL_RANK=r: rank r's images fail to decode when measured)
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from openclip_robust import retention
from test_retention import ToyCLIP, make_args, monitor


def measure(pairs, suite, rank=0, fail_rank=-1):
    args = make_args(retention_data=pairs, retention_suite=suite, rank=rank)
    m, model = monitor(args), ToyCLIP()
    m.ensure_pretrained(args, model, frozen=None)
    model.proj.weight.data = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    if rank == fail_rank:
        def broken(data, preprocess):
            raise ValueError("broken image")
        retention.decodes = broken
    return m.evaluate(args, model, {}, epoch=1)


if __name__ == "__main__":
    out, pairs, suite = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = {"metrics": measure(pairs, suite, rank, int(os.environ.get("FAIL_RANK", -1)))}
    except retention.RetentionError as e:
        result = {"error": str(e)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    sys.exit(3 if "error" in result else 0)
