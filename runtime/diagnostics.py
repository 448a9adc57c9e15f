"""A verdict as a health level a stack already signals: ROS 2 ``diagnostic_msgs/DiagnosticStatus`` levels.

=============  =====  ================================================================================
status         level  why
=============  =====  ================================================================================
certified      OK     the label holds against every patch of the threat
uncertified    WARN   a label, but no guarantee: usable where a wrong sign is tolerable
alert          ERROR  a patch may be present (a detection certificate fired, or cascade stages disagree)
fail-safe      STALE  no answer in time (deadline missed, the source stopped): the last answer is old
fail-safe      ERROR  no answer because something is wrong (invalid frame or box, engine failure)
=============  =====  ================================================================================

STALE is what ROS uses for "no fresh report": a late frame is exactly that, and the stack's watchdog already
knows what to do with it. Every other fail-safe is a fault in this frame, so it is ERROR, not STALE.
"""

from __future__ import annotations

from certinfer.runtime.verdict import Verdict

OK, WARN, ERROR, STALE = 0, 1, 2, 3  # diagnostic_msgs/DiagnosticStatus level constants (bytes in the message)
NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}
_LATE = ("deadline missed", "source broke")


def level(verdict: Verdict) -> int:
    """The DiagnosticStatus level of a verdict (see the module docstring)."""
    if verdict.status == "certified":
        return OK
    if verdict.status == "uncertified":
        return WARN
    if verdict.status == "fail-safe" and verdict.reason.startswith(_LATE):
        return STALE
    return ERROR
