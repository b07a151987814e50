"""fp32 forwards for the terms that difference two nearly equal models.

DiVE's u = f_ft(x) - f_pre(x), SnD's and the kernel method's ||f_ft(x) - f_pre(x)||^2 compare the
fine-tuned model with its frozen copy, whose outputs differ by ~1e-3 of their norm. bf16 rounds
each op to ~4e-3 (fp16 and TF32: ~1e-3), independently in the two models, so under the run's
autocast these terms mostly measure rounding (tiny CLIP, weights moved by 1e-3: AVL 9.5x the fp32
value; tests/losses/test_precise.py). ``--diff-precision fp32`` (default) runs exactly those
forwards with autocast off, half-precision weights upcast (differentiably) and, on CUDA, TF32 off;
everything else keeps the run's --precision.
"""
import contextlib

import torch
from torch.func import functional_call

MODES = ("fp32", "autocast")


def add_args(group):
    group.add_argument("--diff-precision", choices=MODES, default="fp32",
                       help="the forwards whose outputs are differenced against the frozen model (DiVE's u, v; "
                            "SnD's and kernel's teacher distance): fp32 (autocast and TF32 off, half weights "
                            "upcast) or autocast (the run's --precision: faster, but its rounding, ~4e-3 in bf16, "
                            "exceeds the ~1e-3 differences; see docs/performance).")


def wants_fp32(args):
    return getattr(args, "diff_precision", "fp32") == "fp32"


def frozen_precision(precision, diff_precision):
    """The precision the frozen model's differenced outputs are computed in (recorded by teacher caches)."""
    return "fp32" if diff_precision == "fp32" else precision


@contextlib.contextmanager
def no_tf32():
    """TF32 matmuls carry fp16's 10-bit mantissa; upstream turns them on for CUDA. Forward only:
    the flag is global, the backward (gradients, not the compared values) runs with the run's."""
    if not torch.cuda.is_available():
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _up(x):
    return x.float() if torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float32 else x


def fp32_call(fn, *args, **kwargs):
    """fn(*args, **kwargs) in fp32 whatever the surrounding autocast and the weights' dtype; fn is a
    module (possibly DDP-wrapped) or a bound method of one (e.g. ``frozen.encode_image``)."""
    owner = fn if isinstance(fn, torch.nn.Module) else fn.__self__
    inner = getattr(owner, "module", owner)  # DDP's wrapped module, for the half-weight path only
    args = [_up(a) for a in args]
    kwargs = {k: _up(v) for k, v in kwargs.items()}
    with torch.autocast(device_type=next(inner.parameters()).device.type, enabled=False), no_tf32():
        state = {**dict(inner.named_parameters()), **dict(inner.named_buffers())}
        if all(not t.is_floating_point() or t.dtype == torch.float32 for t in state.values()):
            return fn(*args, **kwargs)  # amp: fp32 weights, so through DDP as usual
        if fn is not owner:
            raise TypeError(f"fp32 forward of {fn.__name__}: half-precision weights are upcast for module calls only")
        # pure_bf16 / pure_fp16: upcast copies, the gradient flows back to the half weights
        return functional_call(inner, {k: _up(v) for k, v in state.items()}, tuple(args), kwargs)


def forward(precise, module, *args, **kwargs):
    return fp32_call(module, *args, **kwargs) if precise else module(*args, **kwargs)


def fp32_module(module):
    """Run `module`'s own forward in fp32 wherever it is called from (the kernel method's student image
    tower inside upstream's forward: its output is L_reg's f_ft). Hooks rather than a replaced forward,
    so deepcopy and the state_dict are untouched. Needs fp32 weights (refused under pure_* by the caller)."""
    saved = []  # a stack: the state to restore when the forward returns (or raises)

    def enter(mod, args, kwargs):
        device_type = next(mod.parameters()).device.type
        saved.append((device_type, torch.is_autocast_enabled(device_type), no_tf32()))
        torch.set_autocast_enabled(device_type, False)
        saved[-1][2].__enter__()
        return tuple(_up(a) for a in args), {k: _up(v) for k, v in kwargs.items()}

    def leave(mod, args, output):
        device_type, enabled, tf32 = saved.pop()
        tf32.__exit__(None, None, None)
        torch.set_autocast_enabled(device_type, enabled)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, always_call=True)
