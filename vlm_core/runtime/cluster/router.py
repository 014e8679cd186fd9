"""The Ray Serve request router of the model deployment: conversation- and image-aware, bounded by load.

Ray Serve runs one router per deployment handle, in the process that calls the handle (the ingress). For
each request it asks `choose_replicas` for ranked lists of replicas; this one answers with the replica
`affinity.choose` picks (the request's session, else its longest prefix match, else the less loaded of two),
then every other replica as the fallback rank (tried when the first is full: Ray's `max_ongoing_requests`).
Loads are Ray's own queue lengths (its cache of what each replica reported, updated on every send and
completion), or, where Ray has none yet, the requests this router has in flight there. Once a request is
sent, its session and prefix chain point at that replica (`on_request_routed`); a replica that dies is
forgotten. The request's RoutingKey comes from the ingress as the ``routing`` keyword argument.

    RequestRouterConfig(request_router_class="vlm_core.runtime.cluster.router:AffinityRequestRouter",
                        request_router_kwargs={"margin": 4, "affinity": True})
"""
from __future__ import annotations

import collections
import importlib
import random
import time
import weakref

from ray.serve.request_router import FIFOMixin, RequestRouter

from vlm_core.runtime.cluster.affinity import (
    DEFAULT_CAPACITY,
    DEFAULT_MARGIN,
    DEFAULT_MIN_MATCH,
    AffinityTable,
    RoutingKey,
    choose,
)

# The routers of this process, so the ingress can list the replicas it routes to (/health, /metrics).
ROUTERS: weakref.WeakSet = weakref.WeakSet()


class AffinityRequestRouter(FIFOMixin, RequestRouter):
    """See the module docstring; the arguments of `initialize_state` come from `request_router_kwargs`."""

    def initialize_state(self, margin: int = DEFAULT_MARGIN, affinity: bool = True,
                         min_match: float = DEFAULT_MIN_MATCH, capacity: int = DEFAULT_CAPACITY, seed=None):
        """margin: requests in flight above the least loaded replica past which affinity is ignored;
        affinity: False routes by load alone; min_match: the share of a request a prefix match must cover."""
        self.margin, self.affinity, self.min_match = int(margin), bool(affinity), float(min_match)
        self.table = AffinityTable(capacity)
        self.rng = random.Random(seed)
        self.in_flight: collections.Counter = collections.Counter()
        self.decisions: collections.Counter = collections.Counter()  # reason -> count
        self.decision_seconds = 0.0  # total time spent in `choose`, for the cost per request
        # Ray ships this class to the ingress pickled by value (cloudpickle), with a copy of this module's
        # globals: register in the module as imported, where the ingress looks.
        importlib.import_module("vlm_core.runtime.cluster.router").ROUTERS.add(self)

    @property
    def deployment_name(self) -> str:
        return self._deployment_id.name

    def replica_ids(self) -> list:
        """The replicas this router can send to now (unique ids, as ``x-vlm-replica`` names them)."""
        return sorted(r.unique_id for r in self._replica_id_set)

    def _load(self, replica) -> int:
        cached = self._replica_queue_len_cache.get(replica.replica_id)
        return int(cached) if cached is not None else self.in_flight[replica.replica_id.unique_id]

    @staticmethod
    def _key(pending_request) -> RoutingKey:
        if pending_request is None:
            return RoutingKey()
        return RoutingKey.from_dict((pending_request.kwargs or {}).get("routing"))

    async def choose_replicas(self, candidate_replicas: list, pending_request=None) -> list:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {unique_id: self._load(r) for unique_id, r in by_id.items()}
        started = time.perf_counter()
        choice = choose(self._key(pending_request), loads, self.table, self.margin, self.rng, self.affinity,
                        self.min_match)
        self.decision_seconds += time.perf_counter() - started
        self.decisions[choice.reason] += 1
        first = by_id[choice.replica]
        others = sorted((r for r in candidate_replicas if r is not first), key=self._load)
        return [[first], others] if others else [[first]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.table.record(self._key(pending_request), replica_id.unique_id)
        self.in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        if self.in_flight[replica_id.unique_id] > 0:
            self.in_flight[replica_id.unique_id] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
        self.in_flight.pop(replica_id.unique_id, None)
