"""The method registry (timm-style), a leaf module: ``@register_loss("name")`` on a RobustLoss subclass.

A new method is one module under ``openclip_robust/losses/`` plus its import line in
``losses/__init__.py``, which imports them all; ``--robust-loss`` lists whatever is registered.
"""
_LOSSES = {}


def register_loss(name):
    def decorate(cls):
        if name in _LOSSES:
            raise ValueError(f"robust loss '{name}' is registered twice")
        cls.name = name
        _LOSSES[name] = cls
        return cls
    return decorate


def loss_names():
    return sorted(_LOSSES)


def get_loss_class(name):
    if name not in _LOSSES:
        raise ValueError(f"unknown robust loss '{name}'; choose one of: {', '.join(loss_names())}")
    return _LOSSES[name]
