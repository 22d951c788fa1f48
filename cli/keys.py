"""`pbft keygen`: keys and DIR/cluster.toml for a local cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.exits import EXIT_OK, EXIT_USAGE


def add_keygen(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    keygen = commands.add_parser(
        "keygen",
        help="generate keys and DIR/cluster.toml for a local cluster",
        epilog="exit codes:\n  0  written\n  2  bad arguments, or DIR already holds a cluster",
        formatter_class=formatter,
    )
    keygen.add_argument("--replicas", type=int, default=4)
    keygen.add_argument("--clients", type=int, default=2)
    keygen.add_argument("--out", required=True, metavar="DIR")
    keygen.add_argument("--host", default="127.0.0.1")
    keygen.add_argument("--base-port", type=int, default=7000)
    keygen.add_argument("--accounts-per-client", type=int, default=2)
    keygen.add_argument("--initial-balance", type=int, default=100_000)
    keygen.add_argument(
        "--generated-accounts",
        type=int,
        metavar="N",
        help="a [genesis] of N accounts by rule instead of --accounts-per-client listed ones",
    )


def keygen(arguments: argparse.Namespace) -> int:
    from pbft.config import MAX_REPLICAS, MIN_REPLICAS
    from runtime.cluster import MAX_ACCOUNTS, MAX_CLIENTS, write_cluster

    problem = None
    if not MIN_REPLICAS <= arguments.replicas <= MAX_REPLICAS:
        problem = f"--replicas: {arguments.replicas} is not in {MIN_REPLICAS}..{MAX_REPLICAS}"
    elif not 1 <= arguments.clients <= MAX_CLIENTS:
        problem = f"--clients: {arguments.clients} is not in 1..{MAX_CLIENTS}"
    elif not 0 <= arguments.accounts_per_client <= MAX_ACCOUNTS // arguments.clients:
        problem = (
            f"--accounts-per-client: {arguments.accounts_per_client} is not in "
            f"0..{MAX_ACCOUNTS // arguments.clients} (at most {MAX_ACCOUNTS} accounts in all)"
        )
    elif not 1 <= arguments.base_port <= 65536 - arguments.replicas:
        problem = f"--base-port: {arguments.base_port}: the replicas' ports must be in 1..65535"
    elif not arguments.host or len(arguments.host) > 255:
        problem = "--host: expected a host name or address of 1..255 characters"
    elif Path(arguments.out).exists() and not Path(arguments.out).is_dir():
        problem = f"--out: {arguments.out} exists and is not a directory"
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = write_cluster(
            arguments.out,
            replicas=arguments.replicas,
            clients=arguments.clients,
            host=arguments.host,
            base_port=arguments.base_port,
            accounts_per_client=arguments.accounts_per_client,
            initial_balance=arguments.initial_balance,
            generated_accounts=arguments.generated_accounts,
        )
    except (ValueError, FileExistsError) as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"pbft: --out: cannot write in {arguments.out}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path} and {arguments.replicas + arguments.clients} private keys (mode 0600)")
    return EXIT_OK
