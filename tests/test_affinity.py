"""The replica choice of the Ray Serve router (runtime/cluster/affinity.py), as pure functions: no Ray."""
from __future__ import annotations

import base64
import random

from vlm_core.runtime.cluster.affinity import (
    IMAGE_WEIGHT,
    AffinityTable,
    RoutingKey,
    choose,
    routing_key,
)

PIXELS = b"\x89PNG fake image bytes" * 10


def image_part(data: bytes = PIXELS, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def first_turn(text: str = "What is in this photo?", image: dict | None = None) -> dict:
    return {"messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": [image or image_part(), {"type": "text", "text": text}]}]}


def follow_up(body: dict, answer: str = "A cat.", question: str = "What colour?") -> dict:
    return {"messages": body["messages"] + [{"role": "assistant", "content": answer},
                                            {"role": "user", "content": question}]}


def test_a_follow_up_extends_its_first_turns_chain():
    first, second = routing_key(first_turn()), routing_key(follow_up(first_turn()))
    assert second.chain[: len(first.chain)] == first.chain and len(second.chain) > len(first.chain)
    other = routing_key(first_turn("Something else?"))
    # items: system role, its text, user role, the image, the question: all but the question shared
    assert other.chain[:4] == first.chain[:4] and other.chain[4] != first.chain[4]


def test_images_count_by_content():
    png, jpeg_named = routing_key(first_turn()), routing_key(first_turn(image=image_part(mime="image/jpeg")))
    assert png.chain == jpeg_named.chain  # the same bytes under another media type: the same image
    other = routing_key(first_turn(image=image_part(PIXELS + b"!")))
    assert other.chain[3] != png.chain[3] and other.chain[:3] == png.chain[:3]
    assert png.chain[3][1] == IMAGE_WEIGHT


def test_session_from_header_or_user_field():
    assert routing_key({"messages": []}, {"x-session-id": "abc"}).session == "abc"
    assert routing_key({"messages": [], "user": "u7"}).session == "user:u7"
    assert routing_key({"messages": [], "user": "u7"}, {"x-session-id": "abc"}).session == "abc"
    assert routing_key("not a body").chain == () and routing_key({"messages": 3}).chain == ()


def test_follow_up_goes_where_its_first_turn_went():
    table, loads = AffinityTable(), {"r1": 0, "r2": 0, "r3": 0}
    first = routing_key(first_turn())
    table.record(first, "r2")
    choice = choose(routing_key(follow_up(first_turn())), loads, table, rng=random.Random(0))
    assert (choice.replica, choice.reason) == ("r2", "prefix") and choice.matched > IMAGE_WEIGHT
    # the same image in a new conversation with the same system prompt also goes there (its features)
    assert choose(routing_key(first_turn("New question")), loads, table).replica == "r2"


def test_longest_match_wins_then_the_less_loaded():
    table = AffinityTable()
    short = routing_key({"messages": [{"role": "user", "content": "x" * 40}]})
    long = routing_key({"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"},
                                     {"role": "user", "content": "z" * 400}]})
    table.record(short, "r1")
    table.record(long, "r2")
    query = routing_key({"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"},
                                      {"role": "user", "content": "z" * 400}, {"role": "assistant", "content": "ok"}]})
    assert choose(query, {"r1": 0, "r2": 1}, table).replica == "r2"
    table.record(short, "r3")  # r1 and r3 hold the same (short) prefix: the less loaded of them
    assert choose(routing_key({"messages": [{"role": "user", "content": "x" * 40}]}), {"r1": 2, "r3": 1}, table,
                  margin=8).replica == "r3"


def test_session_wins_over_prefix():
    table = AffinityTable()
    table.record(RoutingKey("s1", ()), "r1")
    table.record(routing_key(first_turn()), "r2")
    key = RoutingKey("s1", routing_key(first_turn()).chain)
    assert choose(key, {"r1": 0, "r2": 0}, table).reason == "session"


def test_affinity_is_ignored_past_the_margin():
    table = AffinityTable()
    key = routing_key(first_turn())
    table.record(key, "r1")
    assert choose(key, {"r1": 4, "r2": 0}, table, margin=4).replica == "r1"  # at the bound: still affinity
    choice = choose(key, {"r1": 5, "r2": 0}, table, margin=4, rng=random.Random(1))
    assert (choice.replica, choice.reason) == ("r2", "least_loaded")


def test_the_imbalance_bound_holds_when_every_request_wants_one_replica():
    """1000 arrivals that all have affinity to r0, departures at random: every affinity placement finds r0 at
    most `margin` above the least loaded replica (so affinity leaves it at most margin + 1 ahead), and the
    others still get work."""
    rng, table, margin = random.Random(3), AffinityTable(), 3
    loads = {f"r{i}": 0 for i in range(4)}
    served = dict.fromkeys(loads, 0)
    key = routing_key(first_turn())
    table.record(key, "r0")
    reasons = set()
    for _ in range(1000):
        if rng.random() < 0.45:
            busy = [r for r, n in loads.items() if n]
            if busy:
                loads[rng.choice(busy)] -= 1
        least = min(loads.values())
        choice = choose(key, loads, table, margin=margin, rng=rng)
        reasons.add(choice.reason)
        if choice.reason == "prefix":
            assert choice.replica == "r0" and loads["r0"] <= least + margin
        loads[choice.replica] += 1
        served[choice.replica] += 1
    assert reasons == {"prefix", "least_loaded"}
    assert all(n > 50 for n in served.values())  # nobody starves


def test_new_conversations_spread_over_the_replicas():
    rng, table, loads, served = random.Random(0), AffinityTable(), {"a": 0, "b": 0}, {"a": 0, "b": 0}
    for i in range(8):
        key = routing_key(first_turn(f"question {i}", image=image_part(bytes([i]) * 50)), {"x-session-id": str(i)})
        choice = choose(key, loads, table, rng=rng)
        assert choice.reason == "least_loaded"  # nothing known yet: by load
        table.record(key, choice.replica)
        loads[choice.replica] += 1
        served[choice.replica] += 1
    assert served == {"a": 4, "b": 4}  # two replicas and exact loads: power of two choices alternates


def test_without_affinity_routing_is_by_load_only():
    table = AffinityTable()
    key = routing_key(first_turn())
    table.record(key, "r1")
    assert choose(key, {"r1": 1, "r2": 0}, table, affinity=False).replica == "r2"


def test_pinned_requests_and_a_dead_replica():
    table = AffinityTable()
    key = routing_key(first_turn(), {"x-session-id": "s"})
    table.record(key, "r1")
    assert choose(RoutingKey(replica="r1"), {"r1": 9, "r2": 0}, table).reason == "pinned"
    table.record(RoutingKey(replica="r2", chain=key.chain), "r2")  # pinned requests are not remembered
    assert table.matches(key, ["r2"]) == {}
    table.forget("r1")
    assert table.session(key) is None and table.matches(key, ["r1", "r2"]) == {}
    assert choose(key, {"r2": 0}, table).replica == "r2"


def test_routing_key_round_trips_through_a_dict():
    key = routing_key(follow_up(first_turn()), {"x-session-id": "s"})
    assert RoutingKey.from_dict(key.to_dict()) == key
    assert RoutingKey.from_dict(None) == RoutingKey()


def test_the_table_forgets_the_least_recently_used():
    table = AffinityTable(capacity=3)
    for i in range(5):
        table.record(RoutingKey(f"s{i}", ()), "r")
    assert list(table.sessions) == ["s2", "s3", "s4"]


def test_a_short_shared_system_prompt_does_not_pull_new_conversations():
    table = AffinityTable()
    table.record(routing_key(first_turn()), "r1")
    new = routing_key(first_turn("Another photo", image=image_part(b"other" * 30)))
    assert choose(new, {"r1": 0, "r2": 0}, table, rng=random.Random(0)).reason == "least_loaded"
    long_system = {"messages": [{"role": "system", "content": "Rules. " * 400}, {"role": "user", "content": "a"}]}
    table.record(routing_key(long_system), "r2")
    again = {"messages": [long_system["messages"][0], {"role": "user", "content": "b"}]}
    assert choose(routing_key(again), {"r1": 0, "r2": 0}, table).reason == "prefix"
