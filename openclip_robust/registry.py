"""The method registry (timm-style): ``@register_loss("name")`` on a RobustLoss subclass.

A new method is one module under ``openclip_robust/losses/`` plus its import line in
``losses/__init__.py``; ``--robust-loss`` lists whatever is registered.
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
    import openclip_robust.losses  # noqa: F401  (registers the built-in methods)
    return sorted(_LOSSES)


def get_loss_class(name):
    names = loss_names()
    if name not in _LOSSES:
        raise ValueError(f"unknown robust loss '{name}'; choose one of: {', '.join(names)}")
    return _LOSSES[name]
