"""Status of a memory context and the sliding-window kinds (enums of the compiled core)."""

from ._core import Status, SWAType, status_combine, status_is_fail

__all__ = ["Status", "SWAType", "status_combine", "status_is_fail"]
