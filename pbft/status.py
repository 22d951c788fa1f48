"""Where a replica stands in its view: the one status the replica's parts read."""

from __future__ import annotations

from enum import StrEnum


class ViewStatus(StrEnum):
    # The view's NEW-VIEW is installed (or it is view 0): ordering runs.
    NORMAL = "normal"
    # The replica gave up on `view - 1` and waits for `view`'s NEW-VIEW: nothing is ordered.
    VIEW_CHANGE = "view_change"
