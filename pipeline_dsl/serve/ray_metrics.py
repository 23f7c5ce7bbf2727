"""One /metrics for every replica of `agp serve --ray` (serve/ray.py).

Each `AgpPipeline` replica pushes its Prometheus text to the `AgpMetrics` deployment every
PUSH_S seconds (and takes it back when it stops); the ingress answers GET /metrics with
`merged(texts)`: every replica's series with a `replica` label added (its Serve replica id), so a
single scrape target covers the application and `sum by (model_name)` gives its totals. A
replica whose actor died (killed, its node lost) drops out at the next scrape: a replica's first
push carries its actor handle (and any push after the hub says it lacks it), and `collect` asks
Ray whether those actors are alive. One that only stopped pushing (its actor not known, or not
answering) drops out after STALE_S seconds.
"""
from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

PUSH_S = 1.0               # how often a replica sends its metrics
STALE_S = 15.0             # a replica not heard from for this long is gone
PING_S = 1.0               # how long a scrape waits for a replica's actor to say it is alive
GONE = 1024                # the dead or stopped replicas remembered (a push sent before, arriving after)


@serve.deployment(name="AgpMetrics", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class AgpMetrics:
    """The latest Prometheus text of each replica."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.texts: dict[str, tuple[float, str]] = {}
        self.actors: dict[str, object] = {}      # replica -> its actor's handle
        self.gone: dict[str, None] = {}          # replicas stopped or whose actor died, oldest first

    def put(self, replica: str, text: str, actor=None) -> bool:
        """The latest text of `replica`; `actor`: its actor's handle (ray.get_runtime_context().current_actor).
        Returns whether the hub holds that handle (the replica sends it again when not: a new hub)."""
        if replica in self.gone:
            return True
        self.texts[replica] = (self.clock(), text)
        if actor is not None:
            self.actors[replica] = actor
        return replica in self.actors

    def drop(self, replica: str) -> None:
        """Forget `replica` for good (stopped: its goodbye; or its actor died): its series leave,
        and a push it sent before, arriving after (its pusher cancelled mid-call), does not bring
        them back."""
        self._forget(replica)
        self.gone[replica] = None
        while len(self.gone) > GONE:
            del self.gone[next(iter(self.gone))]

    def _forget(self, replica: str) -> None:
        self.texts.pop(replica, None)
        self.actors.pop(replica, None)

    async def collect(self) -> dict[str, str]:
        now = self.clock()
        for replica in [r for r, (at, _) in self.texts.items() if now - at > STALE_S]:
            self._forget(replica)               # silent, not known dead: a later push brings it back
        known = list(self.actors.items())
        for (replica, _), dead in zip(known, await asyncio.gather(*(died(actor) for _, actor in known))):
            if dead:
                self.drop(replica)
        return {r: text for r, (_, text) in sorted(self.texts.items())}


async def died(actor) -> bool:
    """Whether Ray says the actor died (a call to it raises ActorDiedError). One that does not
    answer within PING_S, or is unavailable for now (its node unreachable), counts as alive: it
    drops out after STALE_S if it stopped pushing."""
    try:
        await asyncio.wait_for(_ready(actor), PING_S)
    except (asyncio.TimeoutError, ActorUnavailableError):
        return False
    except RayActorError:
        return True
    return False


async def _ready(actor):
    return await actor.__ray_ready__.remote()    # every Ray actor's own no-op method


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
