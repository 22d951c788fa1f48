"""GET /v1/cluster: the cluster as this gateway sees it, for the dashboard (gateway/static/).

For each replica: its address, whether the gateway's transport is connected to it, and its
own signed word on where it stands (view, view status, last executed, stable checkpoint),
from a status query (pbft/lookups.py, PaymentClient.replica_status) sent as the caller's
client. Those figures are each replica's claim, not agreed by f + 1: a faulty replica can
say anything about itself, which is what a dashboard of replicas should show. A replica
that did not answer within STATUS_TIMEOUT_S has `answered: false` and nulls.

Dashboards poll, several at a time: one answer is shared by every request that comes within
CACHE_S of it, and concurrent requests wait for the one query in flight, so the replicas
see at most one status query per client per CACHE_S from this gateway however many pages
are open (each replica pays for an answer from that client's lookup budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import trio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from gateway.auth_http import caller
from gateway.keys import Caller
from pbft.client import ReplicaStatus
from pbft.receipt import short_id
from runtime.client import PaymentClient

STATUS_TIMEOUT_S = 1.0
CACHE_S = 1.0

router = APIRouter(tags=["cluster"])


class ReplicaView(BaseModel):
    id: int
    address: str = Field(description="host:port from the cluster file")
    connected: bool = Field(description="this gateway's connection to it is up")
    answered: bool = Field(description=f"it answered the status query within {STATUS_TIMEOUT_S} s")
    view: int | None
    view_status: str | None = Field(description="normal or view_change; null if no answer")
    last_executed: int | None
    stable_checkpoint: int | None


class ClusterView(BaseModel):
    cluster: str = Field(description="the cluster id's first 16 hex digits")
    n: int
    f: int
    replicas: list[ReplicaView]
    embedded_replica: int | None = Field(description="the replica this process hosts")


@dataclass
class _Asked:
    at: float
    statuses: dict[int, ReplicaStatus | None]


class ClusterStatus:
    """The latest status answers per client, and the lock that makes one query at a time."""

    def __init__(self) -> None:
        self.asked: dict[int, _Asked] = {}
        self.locks: dict[int, trio.Lock] = {}

    async def statuses(self, client: PaymentClient) -> dict[int, ReplicaStatus | None]:
        lock = self.locks.setdefault(client.client_id, trio.Lock())
        async with lock:
            asked = self.asked.get(client.client_id)
            now = trio.current_time()
            if asked is None or now - asked.at >= CACHE_S:
                statuses = await client.replica_status(STATUS_TIMEOUT_S)
                asked = _Asked(trio.current_time(), statuses)
                self.asked[client.client_id] = asked
            return asked.statuses


def _cluster_status(request: Request) -> ClusterStatus:
    state = request.app.state
    found = getattr(state, "cluster_status", None)
    if found is None:
        found = state.cluster_status = ClusterStatus()
    return found


@router.get("/v1/cluster", response_model=ClusterView)
async def cluster(request: Request, who: Annotated[Caller, Depends(caller)]) -> ClusterView:
    """The replicas, each with its own signed word on its view, view status, last executed
    and stable checkpoint (not agreed by f + 1), and whether this gateway is connected to
    it; `embedded_replica`: the replica this gateway process hosts, if any."""
    gateway = request.app.state.gateway
    client: PaymentClient = gateway.client_for(who)
    statuses = await _cluster_status(request).statuses(client)
    cluster_file = gateway.cluster
    replicas = []
    for address in cluster_file.replicas:
        status = statuses.get(address.replica_id)
        replicas.append(
            ReplicaView(
                id=address.replica_id,
                address=f"{address.host}:{address.port}",
                connected=client.is_connected(address.replica_id),
                answered=status is not None,
                view=status.view if status else None,
                view_status=status.view_status if status else None,
                last_executed=status.last_executed if status else None,
                stable_checkpoint=status.stable_checkpoint if status else None,
            )
        )
    node = gateway.node
    return ClusterView(
        cluster=short_id(client.core.cluster_id),
        n=cluster_file.config.replica_count,
        f=cluster_file.config.fault_tolerance,
        replicas=replicas,
        embedded_replica=node.replica_id if node is not None else None,
    )
