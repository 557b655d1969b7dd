"""The one exception type for bad user input (arguments, files, data).

Raised at the boundary with a message that says what is wrong and how to fix it; the CLI prints it
and exits with status 2, never a traceback.
"""
import math
import os


class UserError(ValueError):
    """Bad input from the user: a wrong argument, an unreadable or malformed file, unusable data."""


# -- the checks every config's __post_init__ makes, one wording for all of them --------------------------

def check_choice(name: str, value, options) -> None:
    """`value` must be one of `options`."""
    if value not in options:
        raise UserError(f"{name} must be one of {', '.join(map(str, options))}; got {value!r}")


def at_least(name: str, value: int, low: int) -> tuple[bool, str]:
    """A check for `check_all`: (value >= low, the message naming `name` and the value given)."""
    return value >= low, f"{name} must be >= {low}, got {value}"


def check_all(checks) -> None:
    """Raise the first failed (ok, message) check as a UserError."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def check_at_least_one(obj, *names: str) -> None:
    """Each named attribute of `obj` must be an integer >= 1."""
    check_all(at_least(name, getattr(obj, name), 1) for name in names)


def finite_positive(*values) -> bool:
    """Every value a real number, finite and > 0."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)


def check_positive(name: str, value, unset: str = "") -> None:
    """A finite number > 0 (inf and NaN refused: a rate or a norm bound of inf trains NaNs or writes
    bare `Infinity` into JSON). `unset`: what leaving the setting out means, for the message."""
    if not finite_positive(value):
        hint = f" (leave it unset for {unset})" if unset else ""
        raise UserError(f"{name} must be a finite number > 0{hint}, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """A share strictly between 0 and 1 (a split)."""
    if not 0.0 < value < 1.0:
        raise UserError(f"{name} must be in (0, 1), got {value}")


def check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {value}")


def check_time_limit(value: float | None) -> None:
    """None (no limit) or a positive number of seconds."""
    if value is not None and not value > 0:
        raise UserError(f"time_limit must be > 0 seconds, got {value}")


def not_utf8(path, error: UnicodeDecodeError) -> UserError:
    """The error for a file that is not UTF-8 (often latin-1 / Windows-1252), with the fix."""
    return UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); convert it, e.g. "
                     f"`iconv -f latin1 -t utf-8 {os.path.basename(str(path))} > converted`, and give that file")
