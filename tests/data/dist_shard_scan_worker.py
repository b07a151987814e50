"""torchrun worker: readable_shards under gloo; records which shards this rank opened and what it kept."""
import json
import sys

import torch.distributed as dist

from openclip_robust.data import reference


def main(spec, out):
    dist.init_process_group("gloo")
    opened = []
    check = reference.first_sample_ok
    reference.first_sample_ok = lambda path: opened.append(path) or check(path)
    good, _ = reference.readable_shards(spec)
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump({"opened": opened, "good": good}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
