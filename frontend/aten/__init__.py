"""aten op -> kiln IR converters, one small function per aten op (see table.py)."""

from kiln.frontend.aten import complex, elementwise, factory, nn, reduce, shape  # noqa: F401  (registration)
from kiln.frontend.aten.table import TABLE

__all__ = ["TABLE"]
