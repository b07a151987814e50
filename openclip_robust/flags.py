"""Flag values and flag ownership, checked before anything is built.

- Every float flag of the plugin's group must be finite (NaN or inf weights train on garbage).
- Each method checks its own numbers' ranges with ``require`` in its ``validate_args``.
- A flag that only other methods read is an error naming the chosen method: a method's flags are the
  ones its class (or a parent class, e.g. coop/kgcoop inherit contcoop's) added; the reference flags
  belong to methods that draw a reference batch; ``--diff-precision`` to methods with a frozen model
  (the only ones that difference two models' outputs). A flag counts as given when it differs from
  its default: passing a default value explicitly is harmless, so it is not flagged.
"""
import math

from openclip_robust.losses import get_loss_class, loss_names
from openclip_robust.checks import flag

REFERENCE_FLAGS = ("ref_data", "ref_data_upsampling_factors", "ref_batch_size", "ref_workers", "ref_backward")
FROZEN_FLAGS = ("diff_precision",)


def add_method_args(group):
    """Add every registered method's flags to `group`; return {method name: the dests it added}."""
    owners = {}
    for name in loss_names():
        before = {a.dest for a in group._group_actions}
        get_loss_class(name).add_args(group)
        owners[name] = {a.dest for a in group._group_actions} - before
    return owners


def method_flags(method, owners):
    """The dests `method` (a RobustLoss class) reads: its own and its parent classes'."""
    return set().union(*(dests for name, dests in owners.items() if issubclass(method, get_loss_class(name))))


def check_finite(args, actions):
    """Every float flag among `actions` must be a finite number."""
    for action in actions:
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not math.isfinite(value):
            raise ValueError(f"{flag(action.dest)} {value}: must be a finite number")


def check_unused(args, method, owners, defaults):
    """Refuse flags (given: differing from their default) that `method` does not read."""
    given = {d for d, v in defaults.items() if getattr(args, d, v) != v}
    foreign = set().union(*owners.values()) - method_flags(method, owners)
    if not method.needs_reference:
        foreign |= set(REFERENCE_FLAGS)
    if not method.needs_frozen:
        foreign |= set(FROZEN_FLAGS)
    unused = sorted(given & foreign)
    if unused:
        raise ValueError(f"{', '.join(flag(d) for d in unused)}: not used by --robust-loss {method.name}; "
                         f"drop {'it' if len(unused) == 1 else 'them'} (or choose the method that reads "
                         f"{'it' if len(unused) == 1 else 'them'})")
