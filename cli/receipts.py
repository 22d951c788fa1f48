"""`pbft verify-receipt`: check a receipt offline against a cluster file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.exits import EXIT_NO, EXIT_OK, EXIT_USAGE
from cli.ids import named_ids


def add_verify_receipt(commands: Any) -> None:
    verify = commands.add_parser("verify-receipt", help="check a receipt offline")
    verify.add_argument(
        "receipt",
        help="a receipt file written by pbft pay, authorize, capture, void, refund or open-account",
    )
    verify.add_argument("--cluster", required=True)


def verify_receipt(arguments: argparse.Namespace) -> int:
    """Exit 0 valid, 1 invalid (one line saying why), 2 when the input is not a receipt."""
    from pbft.receipt import MAX_RECEIPT_BYTES, ReceiptError, UnreadableReceipt, verify_receipt
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    path = Path(arguments.receipt)
    try:
        # is_file first: a directory or a FIFO is not a receipt (and a FIFO could block).
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            print(f"pbft: {arguments.receipt}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        with path.open("rb") as handle:
            data = handle.read(MAX_RECEIPT_BYTES + 1)
    except OSError as error:
        print(f"pbft: cannot read {arguments.receipt}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        verified = verify_receipt(data, cluster.keyring(), cluster.cluster_id)
    except UnreadableReceipt as error:
        print(f"pbft: {arguments.receipt}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ReceiptError as error:
        print(f"invalid receipt: {error}")
        return EXIT_NO
    fields = {**verified.__dict__, "cluster_id": verified.cluster_id.hex()}
    # The op's fields are under the client's signature and the replies' request digest, so
    # the ids shown (the hold or payment it makes or names) are proven with the outcome.
    names = named_ids(
        verified.op,
        verified.client_id,
        verified.request_id,
        verified.payer,
        verified.ref_client,
        verified.ref_request,
    )
    print(json.dumps({"valid": True, **fields, **names}, default=list))
    return EXIT_OK
