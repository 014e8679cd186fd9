"""bench.memory_limit's pure parts: the limits tried, the step verdicts, the search's stopping point, and the
cgroup helpers' parsing and skip reasons (no cgroup is made and no model runs here)."""
from __future__ import annotations

from bench import cgroup
from bench.memory_limit import limits, roundup_mib, search, summarize_step


def _run(rate=None, oom=False):
    if rate is None:
        return {"answered": False, "oom_killed": oom, "failure": "OOM-killed" if oom else "exit 1"}
    return {"answered": True, "oom_killed": False, "decode_tokens_per_s": rate, "ttft_s": 1.0,
            "peak_rss_mb": 900.0, "same_tokens": True}


def test_roundup_and_limits():
    assert roundup_mib(1000.2, 256) == 1024
    assert roundup_mib(1024.0, 256) == 1024
    assert roundup_mib(0.5, 256) == 256
    assert roundup_mib(40.1, 32) == 64
    assert limits(1024, 256, 0) == [1024, 768, 512, 256]
    assert limits(1024, 256, 600) == [1024, 768]
    assert limits(96, 32, 0) == [96, 64, 32]


def test_step_verdicts():
    assert summarize_step(512, [_run(9.5), _run(9.0)], 10.0, 0.9)["passed"]
    slow = summarize_step(512, [_run(8.0), _run(9.0)], 10.0, 0.9)  # median 8.5 < 9
    assert slow["answered"] and not slow["passed"] and abs(slow["ratio"] - 0.85) < 1e-9
    killed = summarize_step(256, [_run(10.0), _run(oom=True)], 10.0, 0.9)  # one repetition killed: fails
    assert not killed["answered"] and killed["oom_killed"] and not killed["passed"]
    assert killed["failure"] == "OOM-killed"


def test_search_stops_at_first_failure():
    rates = {1024: 10.0, 768: 9.8, 512: 7.0, 256: 10.0}  # 256 would pass but is never reached
    tried = []

    def measure(limit):
        tried.append(limit)
        return [_run(rates[limit])]

    rows, smallest = search([1024, 768, 512, 256], measure, 10.0, 0.9)
    assert tried == [1024, 768, 512] and smallest == 768 and [r["passed"] for r in rows] == [True, True, False]
    rows, smallest = search([512], lambda limit: [_run(oom=True)], 10.0, 0.9)
    assert smallest is None and rows[0]["oom_killed"]


def test_swaps_and_hierarchy_parsing(tmp_path):
    header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    assert cgroup.swap_devices(header) == []
    assert cgroup.swap_devices(header + "/swapfile file 1048572 0 -2\n") == ["/swapfile"]
    mounts = ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
              "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
              "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
              f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    self_cgroup = "4:memory:/box/abc\n1:cpu:/\n0::/\n"
    assert cgroup.memory_hierarchy(mounts, self_cgroup) == (1, "/sys/fs/cgroup/memory", "/box/abc")
    v2_only = f"cgroup2 {tmp_path} cgroup2 rw 0 0\n"
    assert cgroup.memory_hierarchy(v2_only, "0::/user.slice\n") is None  # no memory controller listed
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert cgroup.memory_hierarchy(v2_only, "0::/user.slice\n") == (2, str(tmp_path), "/user.slice")


def test_skip_reasons():
    hierarchy = (1, "/sys/fs/cgroup/memory", "/")
    assert cgroup.skip_reason(0, hierarchy, "linux") is None
    assert "not root" in cgroup.skip_reason(1000, hierarchy, "linux")
    assert "memory controller" in cgroup.skip_reason(0, None, "linux")
    assert "Linux-only" in cgroup.skip_reason(0, hierarchy, "darwin")
