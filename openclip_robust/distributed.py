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



def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
