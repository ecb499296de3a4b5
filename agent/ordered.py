"""Rules between two settings of one config model (``initial <= max``), checked on the whole model.

A field validator on the upper setting is not enough: pydantic does not validate defaults,
so a file that sets only the lower one past the upper one's default passed. These checks run
after the model is built, on the values given and the defaults alike, and report the problem
as a field's own, in the loader's one-line form (``FILE: section.key = value: must be ...``):
on the key the file set (the upper one when it set both), with the value as written.
A leaf module (pydantic only), used by :mod:`agent.config` and the services' sections.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

ORDER_ERROR = "value_order"
"""The error type of a broken order; its message is the whole reason."""


def check_order(model: BaseModel, given: object, low: str, high: str) -> None:
    """Raise unless ``model.low <= model.high``.

    Args:
        model: the validated model.
        given: what it was validated from (the table read from the file), for the value
            as written.
        low: the setting that must not exceed ``high``.
        high: the upper setting.

    Raises:
        ValidationError: one error on ``high`` if the file set it, else on ``low``; raised
            inside a model validator it takes that model's place in the location.
    """
    low_value, high_value = getattr(model, low), getattr(model, high)
    if low_value <= high_value:
        return
    if high in model.model_fields_set:
        key, reason = high, f"must be >= {low} ({exact_number(low_value)})"
    else:
        key, reason = low, f"must be <= {high} ({exact_number(high_value)})"
    written = given.get(key, getattr(model, key)) if isinstance(given, Mapping) else None
    error = PydanticCustomError(ORDER_ERROR, reason)  # no placeholders: the text is final
    raise ValidationError.from_exception_data(
        type(model).__name__, [InitErrorDetails(type=error, loc=(key,), input=written)]
    )


def exact_number(value: float) -> str:
    """``value`` exactly, as TOML would hold it: ``3600000``, ``1234567.5`` (not ``3.6e+06``)."""
    return repr(value).removesuffix(".0")
