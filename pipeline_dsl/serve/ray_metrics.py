"""One /metrics for every replica of `agp serve --ray` (serve/ray.py).

Each `AgpPipeline` replica pushes its Prometheus text to the `AgpMetrics` deployment every
PUSH_S seconds (and takes it back when it stops); the ingress answers GET /metrics with
`merged(texts)`: every replica's series with a `replica` label added (its Serve replica id), so a
single scrape target covers the application and `sum by (model_name)` gives its totals. A
replica that stopped pushing (killed) drops out after STALE_S seconds.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

PUSH_S = 1.0               # how often a replica sends its metrics
STALE_S = 15.0             # a replica not heard from for this long is gone


@serve.deployment(name="AgpMetrics", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class AgpMetrics:
    """The latest Prometheus text of each replica."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (self.clock(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def collect(self) -> dict[str, str]:
        now = self.clock()
        for replica in [r for r, (at, _) in self.texts.items() if now - at > STALE_S]:
            del self.texts[replica]
        return {r: text for r, (_, text) in sorted(self.texts.items())}


class _Merged:
    """A collector of parsed families (one registry renders them once)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def merged(texts: dict[str, str]) -> CollectorRegistry:
    """Prometheus text of several replicas as one registry (the ingress answers it as `agp serve`
    answers its own: serve/metrics.py's `exposition`): the families merged by name, each sample
    with `replica` added to its labels."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return registry
