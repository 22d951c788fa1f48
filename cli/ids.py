"""Holds and payments by id on the command line: CLIENT:REQUEST, the client id and request id
of the request that made them (pbft/operations.py): an authorize's for its hold, a transfer's
for its payment, and for a captured hold the hold's (the payment a refund names)."""

from __future__ import annotations

import re

_ID = re.compile(r"([0-9]+):([0-9]+)")


def format_id(client: int, request: int) -> str:
    return f"{client}:{request}"


def parse_id(option: str, text: str) -> tuple[int, int] | str:
    """CLIENT:REQUEST as (client, request), or one line naming `option` saying what is wrong."""
    from pbft.client import MAX_CLIENT_ID
    from pbft.codec import MAX_UINT64

    matched = _ID.fullmatch(text)
    if matched is None:
        shown = text if len(text) <= 60 else text[:57] + "..."
        return f"{option}: {shown!r} is not CLIENT:REQUEST (two integers, e.g. 0:17)"
    client, request = int(matched.group(1)), int(matched.group(2))
    if client > MAX_CLIENT_ID:
        return f"{option}: client id {client} is not in 0..{MAX_CLIENT_ID}"
    if request > MAX_UINT64:
        return f"{option}: request id {request} is not in 0..2**64-1"
    return client, request


def named_ids(
    op: str, client: int, request: int, payer: str, ref_client: int, ref_request: int
) -> dict[str, str]:
    """What a request of `op` names, as the commands print it: the payment or hold it makes
    (its own id) or refers to (its ref), or the account it opens."""
    own, ref = format_id(client, request), format_id(ref_client, ref_request)
    named: dict[str, dict[str, str]] = {
        "transfer": {"payment": own},
        "authorize": {"hold": own},
        # A captured hold's payment (what a refund names) is the hold's id.
        "capture": {"hold": ref, "payment": ref},
        "void": {"hold": ref},
        "refund": {"payment": ref},
        "open_account": {"account": payer},
    }
    return named.get(op, {})
