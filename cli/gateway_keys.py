"""`pbft gateway-key create|list|revoke`: the gateway's API keys in its SQLite database.

`create` prints the new token once, on stdout alone (TOKEN=$(pbft gateway-key create ...));
the database keeps only its SHA-256. `list` prints one JSON line per key (never a token),
`revoke` the revoked key's line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.exits import EXIT_OK, EXIT_USAGE

_EPILOG = "exit codes:\n  0  done\n  2  bad arguments, an unusable database, or no such key"


def add_gateway_key(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = commands.add_parser(
        "gateway-key",
        help="create, list or revoke the payment gateway's API keys",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    create = actions.add_parser(
        "create",
        help="a new key acting as cluster client I; prints its token once",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    create.add_argument("--db", required=True, metavar="PATH", help="the gateway's database")
    create.add_argument("--client", type=int, required=True, metavar="I")
    listing = actions.add_parser(
        "list", help="the keys (id, client, created, revoked)", epilog=_EPILOG
    )
    listing.add_argument("--db", required=True, metavar="PATH")
    listing.add_argument("--client", type=int, metavar="I", help="only this client's keys")
    revoke = actions.add_parser("revoke", help="revoke key K", epilog=_EPILOG)
    revoke.add_argument("--db", required=True, metavar="PATH")
    revoke.add_argument("--id", type=int, required=True, metavar="K", dest="key_id")


def gateway_key(arguments: argparse.Namespace) -> int:
    from gateway.keys import MAX_CLIENT_ID, ApiKeyError
    from gateway.store import Database, StoreError

    path = Path(arguments.db)
    if arguments.action != "create" and not path.is_file():
        return _usage(f"--db: no gateway database at {path}")
    client = getattr(arguments, "client", None)
    if client is not None and not 0 <= client <= MAX_CLIENT_ID:
        return _usage(f"--client: {client} is not a client id (0..{MAX_CLIENT_ID})")
    try:
        database = Database(path)
    except StoreError as error:
        return _usage(f"--db: {error}")
    try:
        if arguments.action == "create":
            key, token = database.create_key(client)
            print(token)
            print(
                f"pbft: created API key {key.key_id} for client {key.client_id}; "
                "the token is shown only now",
                file=sys.stderr,
            )
        elif arguments.action == "list":
            for key in database.list_keys(client):
                print(json.dumps(key.as_json()))
        else:
            print(json.dumps(database.revoke_key(arguments.key_id).as_json()))
    except ApiKeyError as error:
        return _usage(f"--id: {error}")
    finally:
        database.close()
    return EXIT_OK


def _usage(problem: str) -> int:
    print(f"pbft: {problem}", file=sys.stderr)
    return EXIT_USAGE
