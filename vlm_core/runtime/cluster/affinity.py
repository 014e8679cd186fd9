"""Which replica should answer a chat request: the one that holds its conversation's KV and its images'
features, unless that would pile work on it. Pure Python, no Ray: the Ray Serve request router (router.py)
calls `choose`, and the unit tests call it the same way.

A request is described by a RoutingKey, computed once by the ingress from the body:

* `session`: the conversation, from an ``x-session-id`` header or OpenAI's ``user`` field;
* `chain`: the request's prefix as a chain of hashes, one per item (the tools, then each message's role and
  each of its parts), each hash covering everything before it, so two requests share the first k hashes
  exactly when they share their first k items. An image part is hashed by its content (blake2b-16 of the
  image's bytes, the digest size the engine's image cache uses): the same photo sent again matches however
  it is named, where the engine's own key (a hash of the preprocessed pixels) would need the image decoded
  in the ingress. Each item carries a weight, its rough token count (text: characters / 4; an image:
  IMAGE_WEIGHT), so the longest match is measured in tokens, as the engine's prefix cache measures it.

`choose` picks, in order:
  1. the replica the session last went to;
  2. else the replica with the longest weighted chain match (ties: the less loaded), when it covers at least
     `min_match` of the request's weight;
  3. else the less loaded of two random replicas (power of two choices).
The imbalance bound: 1 and 2 are taken only while that replica's load (requests in flight) is at most
`margin` above the least loaded replica's; past that the request goes by 3. So affinity never makes any
replica carry more than `margin` requests beyond the least loaded one, and a replica never starves: every
request that has no affinity, or whose affinity is over the bound, goes by load.

    key = routing_key(body, headers)
    choice = choose(key, {"r1": 0, "r2": 3}, table, margin=4, rng=random.Random(0))
    table.record(key, choice.replica)          # once the request is sent there
"""
from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import random

IMAGE_WEIGHT = 256  # tokens an image stands for (a 2B Qwen3-VL photo at its default budget: a few hundred)
DEFAULT_MARGIN = 4  # requests in flight above the least loaded replica that affinity may add (one batch's worth)
# a prefix match counts only when it covers this much of the request (Ray's PrefixCacheAffinityRouter uses 0.1):
# a short shared system prompt must not pull every new conversation to one replica
DEFAULT_MIN_MATCH = 0.1
DEFAULT_CAPACITY = 100_000  # chain hashes and sessions remembered (least recently used forgotten)


@dataclasses.dataclass(frozen=True)
class RoutingKey:
    """What the router knows of a request: its conversation, its prefix chain [(hash, weight)], and, for
    requests meant for one replica (health and metrics of each), that replica."""

    session: str | None = None
    chain: tuple = ()
    replica: str | None = None

    def to_dict(self) -> dict:
        return {"session": self.session, "chain": [list(item) for item in self.chain], "replica": self.replica}

    @classmethod
    def from_dict(cls, data) -> RoutingKey:
        if isinstance(data, RoutingKey):
            return data
        if not isinstance(data, dict):
            return cls()
        return cls(data.get("session"), tuple((str(h), int(w)) for h, w in data.get("chain") or ()),
                   data.get("replica"))


@dataclasses.dataclass(frozen=True)
class Choice:
    """The replica picked and why: "pinned", "session", "prefix" or "least_loaded"."""

    replica: str
    reason: str
    matched: int = 0  # weight of the prefix matched on that replica


def image_digest(url: str) -> str:
    """A content hash of an image_url value: of the decoded bytes for a data: URL, of the URL otherwise."""
    data = url.encode("utf-8", "surrogatepass")
    if url.startswith("data:") and "," in url:
        header, _, payload = url.partition(",")
        if header.endswith(";base64"):
            try:
                data = base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError):
                pass
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _items(body: dict):
    """(kind, text, weight) for each item of a chat body's prefix, in prompt order."""
    if body.get("tools"):  # the chat template renders them at the top of the prompt
        text = json.dumps(body["tools"], sort_keys=True, ensure_ascii=False)
        yield "tools", text, len(text) // 4
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            return
        yield "role", str(message.get("role")), 0  # in the chain (it orders the turns), weighs nothing
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                yield "text", part["text"], max(1, len(part["text"]) // 4)
            elif kind == "image_url":
                info = part.get("image_url")
                url = info.get("url") if isinstance(info, dict) else info
                if isinstance(url, str):
                    yield "image", image_digest(url), IMAGE_WEIGHT
        if message.get("tool_calls"):
            text = json.dumps(message["tool_calls"], sort_keys=True, ensure_ascii=False)
            yield "tool_calls", text, len(text) // 4


def routing_key(body, headers: dict | None = None) -> RoutingKey:
    """The RoutingKey of a chat-completions body (already parsed JSON; anything else gives an empty key, and
    the replica that gets it answers the error). `headers` with lowercase names."""
    headers = headers or {}
    session = headers.get("x-session-id") or None
    if not isinstance(body, dict):
        return RoutingKey(session)
    if session is None and isinstance(body.get("user"), str) and body["user"]:
        session = "user:" + body["user"]
    chain, running = [], hashlib.blake2b(digest_size=16)
    for kind, text, weight in _items(body):
        running.update(f"{kind}\x00{len(text)}\x00".encode() + text.encode("utf-8", "surrogatepass"))
        chain.append((running.copy().hexdigest(), weight))
    return RoutingKey(session, tuple(chain))


class AffinityTable:
    """Which replicas were sent which prefixes and sessions: the router's memory, least recently used first
    forgotten past `capacity` entries of each kind."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.prefixes: collections.OrderedDict = collections.OrderedDict()  # chain hash -> {replica}
        self.sessions: collections.OrderedDict = collections.OrderedDict()  # session -> replica

    def record(self, key: RoutingKey, replica: str) -> None:
        """`key`'s request was sent to `replica`: its session and every prefix of its chain now point there."""
        if key.replica is not None:
            return  # a pinned request (health, metrics) says nothing about conversations
        if key.session is not None:
            self.sessions[key.session] = replica
            self.sessions.move_to_end(key.session)
        for digest, _ in key.chain:
            holders = self.prefixes.get(digest)
            if holders is None:
                holders = self.prefixes[digest] = set()
            holders.add(replica)
            self.prefixes.move_to_end(digest)
        for store in (self.sessions, self.prefixes):
            while len(store) > self.capacity:
                store.popitem(last=False)

    def session(self, key: RoutingKey) -> str | None:
        return self.sessions.get(key.session) if key.session is not None else None

    def matches(self, key: RoutingKey, replicas) -> dict:
        """{replica: weight of the longest prefix of `key.chain` sent to it} for the given replicas."""
        matched, total = {}, 0
        alive = set(replicas)
        for digest, weight in key.chain:
            holders = self.prefixes.get(digest)
            if not holders or not holders & alive:
                break  # the chain is cumulative: no later hash can match where this one does not
            total += weight
            for replica in holders & alive:
                matched[replica] = total
        return matched

    def forget(self, replica: str) -> None:
        """A replica died: nothing points to it any more (its caches died with it)."""
        for session in [s for s, r in self.sessions.items() if r == replica]:
            del self.sessions[session]
        for digest in list(self.prefixes):
            self.prefixes[digest].discard(replica)
            if not self.prefixes[digest]:
                del self.prefixes[digest]


def least_loaded_of_two(loads: dict, rng: random.Random) -> str:
    """Power of two choices: the less loaded of two distinct random replicas (a random one of equals)."""
    replicas = sorted(loads)
    if len(replicas) == 1:
        return replicas[0]
    a, b = rng.sample(replicas, 2)
    if loads[a] == loads[b]:
        return a  # already random
    return a if loads[a] < loads[b] else b


def choose(key: RoutingKey, loads: dict, table: AffinityTable, margin: int = DEFAULT_MARGIN,
           rng: random.Random | None = None, affinity: bool = True, min_match: float = DEFAULT_MIN_MATCH) -> Choice:
    """Pick the replica for `key` among `loads` ({replica: requests in flight}); see the module docstring.

    `affinity=False` routes by load alone (power of two choices), the baseline affinity is measured against."""
    if not loads:
        raise ValueError("no replica to choose from")
    rng = rng or random.Random()
    if key.replica is not None and key.replica in loads:
        return Choice(key.replica, "pinned")
    least = min(loads.values())

    def within_bound(replica: str) -> bool:
        return loads[replica] <= least + margin

    if affinity:
        replica = table.session(key)
        if replica in loads and within_bound(replica):
            return Choice(replica, "session", table.matches(key, [replica]).get(replica, 0))
        matched = table.matches(key, loads)
        total = sum(weight for _, weight in key.chain)
        if matched and max(matched.values()) > 0 and max(matched.values()) >= min_match * total:
            best = max(matched.values())
            tied = sorted((loads[r], r) for r, w in matched.items() if w == best)
            replica = tied[0][1]
            if within_bound(replica):
                return Choice(replica, "prefix", best)
    return Choice(least_loaded_of_two(loads, rng), "least_loaded")
