"""The checker that the jaxtyping import hook in conftest.py applies to layerscope.

Every function and dataclass with a jaxtyping annotation (a tensor with named axes) gets
beartype, which checks its shapes, dtypes and other hints on every call; the rest are
left alone.  Full checks everywhere would refuse a wrong type before a function's own
check could give its friendlier UserError (the runner's corpus, the options' numbers),
and would trip on Protocol hints that cannot be checked at run time.
"""

import typing

from beartype import BeartypeConf, beartype
from beartype.roar import BeartypeDecorHintException
from jaxtyping import AbstractArray

# The PEP 484 numeric tower: an int passes where a float is expected, as type checkers allow.
_CHECK = beartype(conf=BeartypeConf(is_pep484_tower=True))


def _mentions_tensor_shape(hint) -> bool:
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_mentions_tensor_shape(arg) for arg in typing.get_args(hint))


def typechecked(fn):
    """beartype for a function with a shape annotation; anything else unchanged."""
    hints = getattr(fn, "__annotations__", {})
    if not any(_mentions_tensor_shape(hint) for hint in hints.values()):
        return fn
    try:
        return _CHECK(fn)
    except BeartypeDecorHintException:  # a hint beartype cannot check, such as a plain Protocol
        return fn
