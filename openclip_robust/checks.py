"""Range checks of a method's numbers, for its ``validate_args`` (a leaf module: losses, data and guards import it)."""
import math


def flag(dest):
    return f"--{dest.replace('_', '-')}"


def require(args, dest, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError naming the flag unless low <= value <= high (strict where *_open)."""
    value = getattr(args, dest)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{flag(dest)} {value}: must be a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            rule = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"must be {'>' if low_open else '>='} {low:g}"
        else:
            rule = f"must be {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{flag(dest)} {value}: {rule}")
