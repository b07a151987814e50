"""Run under `torchrun --nproc_per_node 2`: kernel-alignment training steps on this rank's half of fixed
global batches, the tiny CLIP wrapped in DDP as upstream wraps it, plain SGD (so that any mis-scaled
gradient shows in the update).

Writes per-step losses, the image tower after the steps and the kernel parameters to OUT/rank{r}.pt;
`run(..., world=1)` is the same on one process and the whole global batch.
usage: dist_kernel_worker.py TINY_MODEL_DIR TEACHER_FILE OUT [--gather-with-grad]
"""
import sys

import open_clip
import torch
import torch.distributed as dist

from openclip_robust.teachers.frozen import frozen_copy
from openclip_robust.losses.kernel import KernelAlignmentLoss
from test_kernel import kernel_args

STEPS, GLOBAL_BATCH = 2, 8


def run(model_dir, teacher_file, rank, world, gather_with_grad=False):
    args = kernel_args(teacher_file, "--kernel-teacher-image-size", "48", "--kernel-gamma", "0.05",
                       "--kernel-coef", "0.5", *(["--gather-with-grad"] if gather_with_grad else []))
    args.rank, args.world_size = rank, world
    model = open_clip.create_model(f"local-dir:{model_dir}", output_dict=True)
    frozen = frozen_copy(model)
    loss = KernelAlignmentLoss(args)
    loss.setup(args, model)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad]}, *loss.param_groups()],
                          lr=0.5)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(STEPS)]
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    losses = []
    for images in batches:
        images = images[part]
        out = net(images, None)
        terms = loss(**out, **loss.step_inputs(model, frozen, images, None), output_dict=True)
        opt.zero_grad()
        (terms["kernel_reg"] + terms["kernel_align"]).backward()
        opt.step()
        losses.append([terms["kernel_reg"].item(), terms["kernel_align"].item()])
    return {"losses": torch.tensor(losses), "visual": {k: v.detach().clone() for k, v in model.visual.state_dict().items()},
            "kernel": {k: v.detach().clone() for k, v in loss.student_kernel.state_dict().items()}}


if __name__ == "__main__":
    model_dir, teacher_file, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save(run(model_dir, teacher_file, rank, world, gather_with_grad="--gather-with-grad" in sys.argv),
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
