"""Rules between two settings of one config model (``initial <= max``), checked on the whole model.

A field validator on the upper setting is not enough: pydantic does not validate defaults,
so a file that sets only the lower one past the upper one's default passed. These checks run
in a model's wrap validator (:func:`validate_ordered`), on the values given and the defaults
alike, and report the problem as a field's own, in the loader's one-line form
(``FILE: section.key = value: must be ...``): on the key the file set (the upper one when it
set both), with the value as written. When other settings of the model are invalid, the rule
is still checked if both of its settings are valid, and its problem is reported with theirs.
A leaf module (pydantic only), used by :mod:`agent.config` and the services' sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, TypeVar, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet

    from pydantic import ModelWrapValidatorHandler
    from pydantic_core import ErrorDetails

M = TypeVar("M", bound=BaseModel)

ORDER_ERROR = "value_order"
"""The error type of a broken order; its message is the whole reason."""
_KNOWN_ERRORS: Final = frozenset(get_args(ErrorType))
"""pydantic's own error types, which it rebuilds from their type and context."""


def validate_ordered(
    model: type[M], data: object, handler: ModelWrapValidatorHandler[M], low: str, high: str
) -> M:
    """Validate ``data`` as ``model`` with ``handler`` and check ``low <= high``: the body of
    the model's wrap validator.

    Args:
        model: the model validated.
        data: what it is validated from (the table read from the file).
        handler: the wrap validator's handler.
        low: the setting that must not exceed ``high``.
        high: the upper setting.

    Raises:
        ValidationError: the handler's errors and, when both settings of the rule are valid
            (as given, or by default) but out of order, the order's: one error on ``high``
            if the file set it, else on ``low``; raised inside a model validator, each takes
            that model's place in the location.
    """
    try:
        validated = handler(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if not isinstance(data, Mapping) or any(
            error["loc"][:1] in ((low,), (high,)) for error in errors
        ):
            raise
        fields = model.model_fields
        values = {
            key: data[key] if key in data else fields[key].get_default(call_default_factory=True)
            for key in (low, high)
        }
        order = _order_error(values, data, data.keys(), low, high)
        if order is None:
            raise
        details = [*map(_init_details, errors), order]
        raise ValidationError.from_exception_data(model.__name__, details) from None
    values = {low: getattr(validated, low), high: getattr(validated, high)}
    order = _order_error(values, data, validated.model_fields_set, low, high)
    if order is not None:
        raise ValidationError.from_exception_data(model.__name__, [order])
    return validated


def _order_error(
    values: Mapping[str, float], given: object, set_keys: AbstractSet[str], low: str, high: str
) -> InitErrorDetails | None:
    """The error of ``values[low] > values[high]``, or None if they are in order.

    ``given`` is the table validated, for the value as written; ``set_keys`` the keys the
    file set."""
    low_value, high_value = values[low], values[high]
    if low_value <= high_value:
        return None
    if high in set_keys:
        key, reason = high, f"must be >= {low} ({exact_number(low_value)})"
    else:
        key, reason = low, f"must be <= {high} ({exact_number(high_value)})"
    written = given.get(key, values[key]) if isinstance(given, Mapping) else None
    error = PydanticCustomError(ORDER_ERROR, reason)  # no placeholders: the text is final
    return InitErrorDetails(type=error, loc=(key,), input=written)


def _init_details(error: ErrorDetails) -> InitErrorDetails:
    """``error`` as ``ValidationError.from_exception_data`` takes it back, unchanged."""
    kind = error["type"]
    details = InitErrorDetails(
        type=kind if kind in _KNOWN_ERRORS else PydanticCustomError(kind, error["msg"]),
        loc=error["loc"],
        input=error["input"],
    )
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details


def exact_number(value: float) -> str:
    """``value`` exactly, as TOML would hold it: ``3600000``, ``1234567.5`` (not ``3.6e+06``)."""
    return repr(value).removesuffix(".0")
