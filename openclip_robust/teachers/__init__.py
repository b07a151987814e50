"""Frozen models the losses compare against: the frozen pre-trained copy, the timm vision teacher, their caches."""
