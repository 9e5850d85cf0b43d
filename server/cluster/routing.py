"""Adapter-affinity routing, as a Ray Serve request router (the `RequestRouter` extension API).

Every engine call of a request carries its adapter set as the handle's `multiplexed_model_id`
(`routing_key`). The router ranks the replicas for it, and Ray Serve does the rest (probing
queue lengths, refusing full replicas, backoff, retries when a replica dies):

  1. replicas that hold every adapter of the set on their device, unless busy;
  2. else the replica that should load the set: the one with the most free device slots,
     ties broken by rendezvous hashing of the set (so a set keeps a stable home when every
     device is full, and only the sets of a replica that left move);
  3. else any replica (Ray takes the least loaded that accepts).

"Busy" is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018; HAProxy's
`hash-balance-factor`): a replica whose ongoing requests reach `balance_factor` x the mean (+1)
is passed over, so a hot adapter spreads to a second replica instead of queueing on one (the
pinning that multiplexing alone shows, ray-project/ray#48741), while cold ones stay put.

What a replica holds comes from its `record_routing_stats` (the registry's device tier, every
`request_routing_stats_period_s`) plus what this router sent it since (reports lag).

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
from typing import Iterable, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_BALANCE_FACTOR = 1.25
DEFAULT_MEMORY_S = 5.0  # how long a set sent to a replica counts as held there without a report


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
    def initialize_state(self, balance_factor: float = DEFAULT_BALANCE_FACTOR,
                         memory_s: float = DEFAULT_MEMORY_S, **_) -> None:
        if balance_factor < 1:
            raise ValueError(f"balance_factor must be >= 1, got {balance_factor}")
        self._balance_factor = balance_factor
        self._memory_s = memory_s
        self._sent: dict[ReplicaID, dict[str, float]] = {}  # replica -> adapter name -> when routed there

    # ------------------------------------------------------------------ what each replica holds
    def held(self, replica: RunningReplica) -> set[str]:
        """The replica's device tier as it last reported it, plus what was routed there since."""
        now = time.monotonic()
        sent = self._sent.get(replica.replica_id, {})
        recent = {name for name, at in sent.items() if now - at < self._memory_s}
        return set(replica.routing_stats.get("resident", ())) | recent

    def free_slots(self, replica: RunningReplica, held: set[str]) -> int:
        capacity = replica.routing_stats.get("capacity")
        return max(capacity - len(held), 0) if isinstance(capacity, int) else 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        names = key_names(pending_request.metadata.multiplexed_model_id)
        if names:
            sent = self._sent.setdefault(replica_id, {})
            now = time.monotonic()
            for name in names:
                sent[name] = now
            if len(sent) > 4096:  # forget old entries; reports tell the rest
                for name in [n for n, at in sent.items() if now - at >= self._memory_s]:
                    del sent[name]

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [r for r in self._sent if r not in live]:
            del self._sent[gone]

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
        bound = math.ceil(self._balance_factor * (sum(load.values()) + 1) / len(candidate_replicas))
        held = {r.replica_id: self.held(r) for r in candidate_replicas}

        holders = [r for r in candidate_replicas if names <= held[r.replica_id] and load[r.replica_id] < bound]
        others = [r for r in candidate_replicas if not names <= held[r.replica_id] and load[r.replica_id] < bound]
        others.sort(key=lambda r: (-self.free_slots(r, held[r.replica_id]), -rendezvous(key, r.replica_id)))
        ranks = [rank for rank in (holders, others[:1]) if rank]
        ranks.append(candidate_replicas)
        return ranks
