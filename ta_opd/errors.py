"""Exceptions raised by the TA-OPD core.

Both derive from ``ValueError`` so callers that already catch bad-value errors keep working;
the message always names the offending value and what is allowed.
"""


class TAConfigError(ValueError):
    """A TA-OPD knob has a value outside its allowed set (raised at config build time)."""


class TAInputError(ValueError):
    """A tensor handed to the core has the wrong shape, dtype, range or non-finite values."""
