"""Run under `torchrun --nproc_per_node N`: DiVE on this rank's slice of a fixed global batch.

Writes m after every step to OUT/rank{r}.pt, for tests/losses/test_dive_distributed.py to compare.
"""
import sys

import torch
import torch.distributed as dist

from openclip_robust.losses.dive import DiVELoss
from test_dive_snd_replay import make_args, unit


def global_batches(steps, n=8, d=6):
    g = torch.Generator().manual_seed(1)
    return [[unit(torch.randn(n, d, generator=g)) for _ in range(4)] for _ in range(steps)]


def run(rank, world, steps):
    loss = DiVELoss(make_args(dive_alpha=0.9, rank=rank, world_size=world))
    ms = []
    for f, fp, g, gp in global_batches(steps):
        part = slice(rank * len(f) // world, (rank + 1) * len(f) // world)
        loss.regularizer(torch.tensor(1.0), f[part], g[part], fp[part], gp[part])
        loss.on_optimizer_step()
        ms.append(loss.m.clone())
    return torch.stack(ms)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save(run(rank, world, steps=3), f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
