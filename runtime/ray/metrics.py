"""The replicas' Prometheus texts merged into one exposition (`merge`), each sample labelled with its
`replica`: the router's `GET /metrics`."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Merged:
    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, text in self.texts.items():
            for fam in text_string_to_metric_families(text):
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {"replica": replica, **s.labels}, s.value, s.timestamp, s.exemplar)
        yield from families.values()


def merge(texts: dict[str, str]) -> bytes:
    """One exposition of `texts` (replica -> its Prometheus text), every sample labelled `replica`."""
    registry = CollectorRegistry()
    registry.register(_Merged(texts))
    return generate_latest(registry)
