#!/usr/bin/env python3
"""Sums a `perf record` profile (`BENCH_PERF=1 scripts/bench --growth` takes one of the
whole machine during each saturated `get message` run) into where the time goes: per process, the
kernel's share (scheduling and wake-ups, the network stack, other system calls) and the
user-space share by component (HTTP stack, Redis client, MySQL client, JSON, allocator,
async runtime, ...).

    python3 bench/perf_summary.py .data/bench/perf-get-message-small.data [requests [pids]]

With a comma-separated list of process ids, only those processes count (for a profile
taken with `perf record -a`). With the number of requests measured during the profile, each share is also given in
microseconds of CPU per request (samples × sampling period / requests)."""

import re
import subprocess
import sys

KERNEL = [
    ("scheduling, wake-ups", re.compile(r"finish_task_switch|__schedule|schedule|_raw_spin_unlock|try_to_wake|futex|"
                                        r"ttwu|enqueue|dequeue|pick_next|update_curr|switch_|wake|select_task|idle")),
    ("network stack", re.compile(r"tcp|ip_|ipv4|skb|sock|net_|napi|__dev|loopback|inet|_copy_to_iter|"
                                 r"_copy_from_iter|bbr|dst_|__netif|sk_|validate_xmit|raw_")),
    ("epoll/poll", re.compile(r"poll|ep_|epoll")),
]
USER = [
    ("allocator", re.compile(r"^_?mi_|mimalloc|malloc|free|realloc|memmove|memcpy|memset|memcmp")),
    ("JSON, dates, formatting", re.compile(r"serde_json|serde::|serde_core|Serialize|Deserialize|itoa|ryu|chrono|fmt")),
    ("MySQL client (sqlx)", re.compile(r"sqlx|mysql", re.I)),
    ("Redis client", re.compile(r"redis::|redis_|combine::")),
    ("HTTP (hyper, axum, tower)", re.compile(r"hyper|axum|tower|http::|httparse|h1|matchit|percent_encoding")),
    ("async runtime (tokio)", re.compile(r"tokio|mio|parking_lot|std::sync|crossbeam")),
    ("the service's own code", re.compile(r"chat_system")),
]


def category(comm, dso, sym):
    if dso == "[kernel.kallsyms]":
        for name, pattern in KERNEL:
            if pattern.search(sym):
                return "kernel: " + name
        return "kernel: other"
    if comm.startswith("tokio") or dso == "chat-system":
        for name, pattern in USER:
            if pattern.search(sym):
                return name
        return "other user space" if dso != "chat-system" else "chat-system: other"
    return "user space"


def main():
    data = sys.argv[1]
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else None
    pids = ["--pid", sys.argv[3]] if len(sys.argv) > 3 else []
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "comm,dso,sym",
                          "--percent-limit", "0", "-F", "sample,comm,dso,sym", *pids],
                         capture_output=True, text=True, check=True).stdout
    period = None
    header = subprocess.run(["perf", "report", "-i", data, "--header-only"], capture_output=True, text=True).stdout
    m = re.search(r"sample_freq \} = (\d+)", header)
    if m:
        period = 1 / int(m.group(1))
    totals, procs, total = {}, {}, 0
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        n, comm, dso, sym = int(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
        proc = "api" if comm.startswith("tokio") or comm == "chat-system" else \
            "MariaDB" if comm.startswith(("mariadbd", "mysqld", "one_connection")) or "mariadb" in dso else \
            "Redis" if comm.startswith(("redis", "io_thd", "bio_")) else comm
        key = (proc, category(comm, dso, sym))
        totals[key] = totals.get(key, 0) + n
        procs[proc] = procs.get(proc, 0) + n
        total += n
    print(f"{'process':<10} {'where':<34} {'share':>7}" + (f" {'µs/request':>11}" if requests and period else ""))
    for proc in sorted(procs, key=procs.get, reverse=True):
        rows = sorted(((k[1], v) for k, v in totals.items() if k[0] == proc), key=lambda x: -x[1])
        for where, n in [("(all)", procs[proc])] + rows:
            us = f" {n * period * 1e6 / requests:>11.1f}" if requests and period else ""
            print(f"{proc:<10} {where:<34} {n / total:>7.1%}{us}")
    print(f"samples: {total}")


if __name__ == "__main__":
    main()
