"""Reading the [[byzantine]] entries of a scenario: a replica's or a client's behaviour,
its window and parameters, checked against the adversary's registry."""

from __future__ import annotations

from typing import Any, Final

from sim.scenario.spec import (
    BEHAVIOR_KINDS,
    BEHAVIOR_PARAMETERS,
    BEHAVIORS,
    CLIENT_BEHAVIOR_KINDS,
    CLIENT_BEHAVIOR_PARAMETERS,
    CLIENT_BEHAVIORS,
    MAX_DURATION_MS,
    ByzantineSpec,
)
from sim.scenario.values import ValueReader, describe, is_integer, show

_BYZANTINE_PARAMETER_KEYS: Final = ("delay_ms", "client", "kind", "groups")
_BYZANTINE_KEYS: Final = ("replica", "behavior", "at_ms", "until_ms", *_BYZANTINE_PARAMETER_KEYS)


class AdversaryReader(ValueReader):
    """Checks the [[byzantine]] entries of one parsed document."""

    def byzantine(
        self, tables: list[dict[str, Any]], replicas: int, clients: int | None = None
    ) -> tuple[ByzantineSpec, ...]:
        entries: list[ByzantineSpec] = []
        listed_at: dict[int, int] = {}
        clients_listed_at: dict[int, int] = {}
        ordered: list[ByzantineSpec] = []
        for index, table in enumerate(tables):
            path = f"byzantine[{index}]"
            self.known_keys(table, _BYZANTINE_KEYS, path)
            if "client" in table:
                takes_client = [
                    name for name, takes in BEHAVIOR_PARAMETERS.items() if "client" in takes
                ]
                if "replica" not in table:
                    ordered.append(
                        self.byzantine_client(table, path, clients, clients_listed_at, index)
                    )
                    continue
                if table.get("behavior") not in takes_client:
                    raise self.error(
                        f"{path}.client",
                        "both replica and client given: an entry is one Byzantine replica "
                        "(replica = N) or one Byzantine client (client = N); only behavior "
                        f"{' or '.join(repr(name) for name in takes_client)} takes client as "
                        "its parameter",
                    )
            replica = self.replica_id(
                self.required(table, "replica", path), f"{path}.replica", replicas
            )
            if replica in listed_at:
                raise self.error(
                    f"{path}.replica",
                    f"replica {replica} is already listed in byzantine[{listed_at[replica]}]",
                )
            listed_at[replica] = index
            behavior = self.choice(
                self.required(table, "behavior", path), f"{path}.behavior", BEHAVIORS
            )
            entries.append(self.byzantine_entry(table, path, replica, behavior, clients, replicas))
            ordered.append(entries[-1])
        # With every replica Byzantine there is no correct replica left to check anything on.
        self.check(
            len(entries) <= replicas - 1,
            "byzantine",
            f"at most {replicas - 1} replica entries (cluster.replicas - 1), got {len(entries)}",
        )
        # Twin copies pair up by side with the copies of another twin, never by group.
        twins = frozenset(entry.replica for entry in entries if entry.behavior == "twin")
        for index, entry in enumerate(ordered):
            for group_index, group in enumerate(entry.groups or ()):
                for member_index, member in enumerate(group):
                    if member in twins:
                        raise self.error(
                            f"byzantine[{index}].groups[{group_index}][{member_index}]",
                            f"replica {member} is a twin too: the copies of two twins pair up "
                            "by side (first with first, second with second); list only the "
                            "other replicas",
                        )
        # In the file's order, replicas and clients alike.
        return tuple(ordered)

    def byzantine_client(
        self,
        table: dict[str, Any],
        path: str,
        clients: int | None,
        listed_at: dict[int, int],
        index: int,
    ) -> ByzantineSpec:
        """A [[byzantine]] entry naming a client (client = N) instead of a replica."""
        client_path = f"{path}.client"
        value = table["client"]
        if not is_integer(value):
            raise self.error(client_path, f"expected a client id (integer), got {describe(value)}")
        if clients is not None:
            self.check(
                0 <= value < clients,
                client_path,
                f"client {show(value)} does not exist: workload.clients = {clients}, ids "
                f"are 0..{clients - 1}",
            )
        client = self.integer(value, client_path, 0, None)
        if client in listed_at:
            raise self.error(
                client_path, f"client {client} is already listed in byzantine[{listed_at[client]}]"
            )
        listed_at[client] = index
        behavior = self.choice(
            self.required(table, "behavior", path), f"{path}.behavior", CLIENT_BEHAVIORS
        )
        takes = CLIENT_BEHAVIOR_PARAMETERS.get(behavior, ())
        for key in _BYZANTINE_PARAMETER_KEYS:
            self.check(
                key == "client" or key in takes or key not in table,
                f"{path}.{key}",
                f"not used by client behavior {behavior!r}",
            )
        at_ms, until_ms = self.window(table, path)
        kind = None
        if behavior in CLIENT_BEHAVIOR_KINDS:
            kinds = CLIENT_BEHAVIOR_KINDS[behavior]
            kind = self.choice(table.get("kind", kinds[0]), f"{path}.kind", kinds)
        return ByzantineSpec(
            replica=None,
            behavior=behavior,
            at_ms=at_ms,
            until_ms=until_ms,
            client=client,
            kind=kind,
        )

    def byzantine_entry(
        self,
        table: dict[str, Any],
        path: str,
        replica: int,
        behavior: str,
        clients: int | None,
        replicas: int,
    ) -> ByzantineSpec:
        takes = BEHAVIOR_PARAMETERS.get(behavior, ())
        for key in _BYZANTINE_PARAMETER_KEYS:
            self.check(
                key in takes or key not in table,
                f"{path}.{key}",
                f"not used by behavior {behavior!r}",
            )
        if behavior == "twin":
            # Both copies run from the start to the end: a twin has no window.
            for key in ("at_ms", "until_ms"):
                self.check(key not in table, f"{path}.{key}", "not used by behavior 'twin'")
        at_ms, until_ms = self.window(table, path)
        groups = None
        if "groups" in takes:
            groups_path = f"{path}.groups"
            groups = self.groups(self.required(table, "groups", path), groups_path, replicas)
            self.check(
                len(groups) == 2,
                groups_path,
                f"a twin has two copies: exactly 2 groups, got {len(groups)}",
            )
            for group_index, group in enumerate(groups):
                for member_index, member in enumerate(group):
                    self.check(
                        member != replica,
                        f"{groups_path}[{group_index}][{member_index}]",
                        f"replica {replica} is the twin itself",
                    )
        delay_ms = None
        if "delay_ms" in table:
            delay_ms = self.integer(table["delay_ms"], f"{path}.delay_ms", 0, MAX_DURATION_MS)
        client = None
        if "client" in takes:
            client_path = f"{path}.client"
            value = self.required(table, "client", path)
            if not is_integer(value):
                raise self.error(
                    client_path, f"expected a client id (integer), got {describe(value)}"
                )
            if clients is not None:
                self.check(
                    0 <= value < clients,
                    client_path,
                    f"client {show(value)} does not exist: workload.clients = {clients}, ids "
                    f"are 0..{clients - 1}",
                )
            client = self.integer(value, client_path, 0, None)
        kind = None
        if behavior in BEHAVIOR_KINDS:
            kinds = BEHAVIOR_KINDS[behavior]
            kind = self.choice(table.get("kind", kinds[0]), f"{path}.kind", kinds)
        return ByzantineSpec(
            replica=replica,
            behavior=behavior,
            at_ms=at_ms,
            until_ms=until_ms,
            delay_ms=delay_ms,
            client=client,
            kind=kind,
            groups=groups,
        )
