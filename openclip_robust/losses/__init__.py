"""Every robust method, one module each; importing this package registers them all."""
from openclip_robust.losses import contcoop, dive, flyp, kernel, l2sp, replay, snd  # noqa: F401  (registration)
from openclip_robust.losses.registry import get_loss_class, loss_names, register_loss  # noqa: F401
