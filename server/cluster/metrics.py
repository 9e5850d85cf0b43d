"""Per-replica Prometheus metrics on the ingress' /metrics.

Each replica keeps its own registry (server/metrics.py, attached to its engine); the ingress'
periodic sync brings its text. They are exposed as `adapter_server_replica_<name>` with a
`replica` label, beside the ingress' own families, plus each replica's device-cache hit ratio.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

PREFIX, REPLICA_PREFIX = "adapter_server_", "adapter_server_replica_"


class ReplicaMetrics:
    """A prometheus_client collector over `engine.snapshots` (remote.RemoteEngine)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        families: dict[str, Metric] = {}
        ratio = GaugeMetricFamily(REPLICA_PREFIX + "device_cache_hit_ratio",
                                  "adapter lookups found on the replica's device / all lookups", labels=["replica"])
        for snap in self.engine.snapshots:
            for family in text_string_to_metric_families(snap.metrics.decode()):
                if not family.name.startswith(PREFIX) or not family.samples:
                    continue
                name = REPLICA_PREFIX + family.name[len(PREFIX):]
                out = families.get(name)
                if out is None:
                    out = families[name] = Metric(name, family.documentation, family.type)
                for s in family.samples:
                    out.add_sample(REPLICA_PREFIX + s.name[len(PREFIX):], {**s.labels, "replica": snap.replica}, s.value)
            lookups = snap.device_hits + snap.device_misses
            if lookups:
                ratio.add_metric([snap.replica], snap.device_hits / lookups)
        yield from families.values()
        yield ratio

    def describe(self):
        return []  # families depend on what the replicas report: collected at scrape time only
