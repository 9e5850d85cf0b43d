"""Adapter-affinity routing, as a Ray Serve request router (the `RequestRouter` extension API).

Every engine call of a request carries its adapter set as the handle's `multiplexed_model_id`
(`routing_key`). The router ranks the replicas for it, and Ray Serve does the rest (probing
queue lengths, refusing full replicas, backoff, retries when a replica dies):

  1. replicas that hold every adapter of the set on their device, unless busy (one after the
     other, in the set's rendezvous order);
  2. else the replica that should load the set: the one with the most free device slots, else
     the one whose device holds the adapter unused the longest (its LRU victim is then the
     coldest in the cluster: together the devices act like one LRU cache), ties broken by
     rendezvous hashing of the set (a stable home; only the sets of a replica that left move);
  3. else any replica (Ray takes the least loaded that accepts).

"Busy": its engine batch is full (`batch` ongoing calls; below that one more row costs little)
and its load is over the bound of consistent hashing with bounded loads (Mirrokni, Thorup,
Zadimoghaddam 2018; HAProxy's `hash-balance-factor`): `balance_factor` x the mean (+1). Such a
replica is passed over, so a hot adapter spreads to a second replica instead of queueing on one
(the pinning that multiplexing alone shows, ray-project/ray#48741), while cold ones stay put.

What a replica holds: the router keeps a model of each replica's device LRU, fed by its own
routing decisions (exact while this router sends all the adapter traffic, and never stale);
a replica it has not routed to yet starts from its own report (`record_routing_stats`: the
registry's device tier), e.g. after the ingress restarted.

`routing="random"` (the baseline of the benchmarks and tests) gives each request a key of its
own instead: both of its calls go to one replica drawn uniformly at random.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import uuid
from collections import OrderedDict
from typing import Iterable, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_BALANCE_FACTOR = 1.25
DEFAULT_CAPACITY = 16  # device slots per replica when its report does not say
DEFAULT_BATCH = 32  # a replica's engine batch (max_batch)


def routing_key(model: str, adapters: Iterable[str] | None, base_name: str) -> str:
    """The adapter set a request needs, as a multiplexed model id ("" for the base model).
    A stack routes by its set: the order of the stack does not change where its weights are."""
    names = set(adapters or ()) | ({model} if model != base_name else set())
    return json.dumps(sorted(names)) if names else ""


def random_key() -> str:
    """A request's key under uniform random routing."""
    return RANDOM + uuid.uuid4().hex


RANDOM = "~"


def key_names(key: str) -> frozenset[str]:
    return frozenset(json.loads(key)) if key and not key.startswith(RANDOM) else frozenset()


def rendezvous(key: str, replica: ReplicaID) -> int:
    """Highest-random-weight hashing: each (set, replica) pair gets a stable pseudo-random rank."""
    digest = hashlib.blake2b(f"{key}\0{replica.unique_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, balance_factor: float = DEFAULT_BALANCE_FACTOR, capacity: int = DEFAULT_CAPACITY,
                         batch: int = DEFAULT_BATCH, **_) -> None:
        if balance_factor < 1:
            raise ValueError(f"balance_factor must be >= 1, got {balance_factor}")
        self._balance_factor = balance_factor
        self._capacity = capacity
        self._batch = batch
        self._devices: dict[ReplicaID, OrderedDict[str, float]] = {}  # adapter -> last routed, oldest first

    # ------------------------------------------------------------------ what each replica holds
    def capacity(self, replica: RunningReplica) -> int:
        capacity = replica.routing_stats.get("capacity")
        return capacity if isinstance(capacity, int) and capacity > 0 else self._capacity

    def device(self, replica: RunningReplica) -> OrderedDict:
        """The model of the replica's device LRU (seeded from its report the first time)."""
        device = self._devices.get(replica.replica_id)
        if device is None:
            resident = replica.routing_stats.get("resident", ())
            device = self._devices[replica.replica_id] = OrderedDict((n, -math.inf) for n in resident)
        return device

    def placement(self, replica: RunningReplica, key: str) -> tuple:
        """Where a set held nowhere goes, best first: the replica with the most free device
        slots, else the one whose least recently used adapter is the oldest (what its LRU gives
        up is then the coldest in the cluster: the devices act like one LRU cache), then the
        set's rendezvous order."""
        device = self.device(replica)
        oldest = next(iter(device.values()), -math.inf)
        return -(self.capacity(replica) - len(device)), oldest, -rendezvous(key, replica.replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        replica = self._replicas.get(replica_id)
        names = key_names(pending_request.metadata.multiplexed_model_id)
        if replica is None or not names:
            return
        device, now = self.device(replica), time.monotonic()
        for name in sorted(names):
            device[name] = now
            device.move_to_end(name)
        while len(device) > self.capacity(replica):
            device.popitem(last=False)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [r for r in self._devices if r not in live]:
            del self._devices[gone]

    # ------------------------------------------------------------------ the ranking
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key:  # the base model: power of two choices
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if key.startswith(RANDOM):  # uniform random routing: one draw per request
            return [[max(candidate_replicas, key=lambda r: rendezvous(key, r.replica_id))], candidate_replicas]
        names = key_names(key)
        load = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in candidate_replicas}
        bound = max(math.ceil(self._balance_factor * (sum(load.values()) + 1) / len(candidate_replicas)), self._batch)
        holders, others = [], []
        for r in candidate_replicas:
            if load[r.replica_id] < bound:
                (holders if names <= self.device(r).keys() else others).append(r)
        # one holder at a time, in the set's rendezvous order: a request's two calls (reserve,
        # generate) land on the same replica while its load allows
        ranks = [[r] for r in sorted(holders, key=lambda r: -rendezvous(key, r.replica_id))]
        if others:
            ranks.append([min(others, key=lambda r: self.placement(r, key))])
        ranks.append(candidate_replicas)
        return ranks
