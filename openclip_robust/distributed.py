"""Helpers for state that every rank must hold identically."""
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor):
    """Mean of `tensor` over ranks (no gradient); the identity in a single process."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()

