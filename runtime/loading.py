"""User code named on the command line or in entry points: ``module:attribute``."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object"]


def import_object(spec: str, form: str = "module:object") -> Any:
    """The object ``spec`` (``module:attr`` or ``module:attr.sub``) names; ``ValueError`` when
    ``spec`` is not of that form (saying ``form``), ``ImportError``/``AttributeError`` when it
    names nothing."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected {form}, got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
