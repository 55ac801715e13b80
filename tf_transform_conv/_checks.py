"""Argument checks shared across the package.

Each check raises a `ValueError` that names the argument, says what is
allowed and shows what was received, and returns the value normalised (an
`int`, a `bool`). Plain Python and numpy only, so that any module can import
it.
"""

import numpy as np


def is_int(value):
    """Whether `value` is a Python or numpy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value):
    """Whether `value` is a Python or numpy integer or float (a bool is not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_positive_int(value, name, expected="a strictly positive int"):
    """`value` as an int; a ValueError naming `name` unless it is an int >= 1 (not a bool).

    Args:
        value: what the caller was given.
        name: the argument's name, for the message.
        expected: what the message says is allowed.
    """
    if not is_int(value) or value < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {expected}. "
            f"Received {name}={value!r}."
        )
    return int(value)


def check_nonnegative_int(value, name, expected="an int >= 0"):
    """`value` as an int; a ValueError naming `name` unless it is an int >= 0 (not a bool)."""
    if not is_int(value) or value < 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {expected}. "
            f"Received {name}={value!r}."
        )
    return int(value)


def check_tolerance(value, name):
    """`value` as a float; a ValueError naming `name` unless it is a number >= 0
    (`float("inf")` allowed, NaN not)."""
    if not is_number(value) or not value >= 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a number >= 0 "
            f"(float('inf') to only measure). Received {name}={value!r}."
        )
    return float(value)


def check_bool(value, name):
    """`value` as a bool; a ValueError naming `name` unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected True or False. "
            f"Received {name}={value!r}."
        )
    return bool(value)


def check_choice(value, name, choices):
    """`value`; a ValueError naming `name` and listing `choices` unless it is one of them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one of {list(choices)}. "
            f"Received {name}={value!r}."
        )
    return value
