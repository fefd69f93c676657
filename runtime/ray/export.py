"""A replica's Prometheus series mirrored into Ray's metrics (`ray.util.metrics`), each tagged with the
replica, so that Ray's metrics export (every node's metrics agent, scraped by the cluster's Prometheus) carries
them beside Ray's own. Every sample becomes a gauge of its current value (a counter's total, a histogram's
bucket, sum and count), named as tidal names it; Ray prefixes its exported names with `ray_`."""
from __future__ import annotations

from ray.util.metrics import Gauge


class RayMetricsMirror:
    def __init__(self, replica: str):
        self.replica = replica
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}

    def update(self, registry) -> int:
        """Set every sample of `registry` (a prometheus_client CollectorRegistry); returns how many."""
        n = 0
        for family in registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation timestamps: not a measure
                    continue
                keys = ("replica",) + tuple(sorted(sample.labels))
                gauge = self._gauges.get(sample.name)
                if gauge is None or gauge[1] != keys:
                    gauge = (Gauge(sample.name, family.documentation or sample.name, tag_keys=keys), keys)
                    self._gauges[sample.name] = gauge
                gauge[0].set(sample.value, tags={"replica": self.replica, **sample.labels})
                n += 1
        return n
