#!/usr/bin/env python3
"""The write path's Redis cost on one node and on a 3-master Redis Cluster.

Drives the product's own create-message script directly, as redis-benchmark does (the
script, its KEYS, ARGV and seed commands come from `chat-system create-script`; no key
name is written here), and reports, in one run:

* creates/s and Redis CPU per create on one node (50 clients);
* the same on 3 masters, each loaded with an application whose shard it serves
  (17 clients each), and creates per Redis CPU-second, the figure that scales with
  cores: on a machine with fewer cores than masters + clients the aggregate rate is
  bounded by the cores, not by Redis;
* the spread of 64 shards over the 3 masters (`chat-system queue-status`).

    bench/redis_cluster.py [--creates N]    (scripts/bench --redis-cluster)

Ports: BENCH_REDIS_SINGLE_PORT (default 24600) and BENCH_REDIS_CLUSTER_PORT (24601-24603).
Results: bench/results/redis-cluster.md (+ .json).
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import time

import common
from common import RESULTS, make_log

SINGLE = int(os.environ.get("BENCH_REDIS_SINGLE_PORT", 24600))
FIRST = int(os.environ.get("BENCH_REDIS_CLUSTER_PORT", 24601))
MASTERS = [FIRST, FIRST + 1, FIRST + 2]


log = make_log("redis-cluster bench")


def cli(port, *args):
    return common.redis_cli(port, *args).strip()


def start_node(port, data, cluster):
    d = data / str(port)
    d.mkdir(parents=True)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
            # The deployment's durability settings: they are part of the cost.
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "yes",
            "--pidfile", str(d / "redis.pid"), "--logfile", str(d / "redis.log")]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-require-full-coverage", "no"]
    subprocess.run(args, check=True)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                          text=True).stdout.strip() == "PONG":
            return
        time.sleep(0.1)
    raise SystemExit(f"redis on :{port} did not start")


def stop_nodes(ports):
    for port in ports:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"],
                       capture_output=True)


def create_call(binary, token, env):
    return common.create_script(binary, env, token, chat=1)


def cpu_seconds(port):
    info = cli(port, "INFO", "cpu")
    user = float(re.search(r"used_cpu_user:([\d.]+)", info).group(1))
    system = float(re.search(r"used_cpu_sys:([\d.]+)", info).group(1))
    return user + system


def drive(port, call, creates, clients, results, key):
    sha = cli(port, "SCRIPT", "LOAD", call["script"])
    for command in call["seed"]:
        cli(port, *command)
    args = ["EVALSHA", sha, str(len(call["keys"])), *call["keys"], *call["args"]]
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(clients),
                          "-n", str(creates), "-q", *args],
                         capture_output=True, text=True, check=True).stdout
    results[key] = float(re.search(r"([\d.]+) requests per second", out).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=300_000)
    args = parser.parse_args()
    binary = os.environ.get("CHAT_SYSTEM_BIN")
    if not binary:
        binary = str(common.build_release() / "chat-system")
    data = pathlib.Path(tempfile.mkdtemp(prefix="chat-system-redis-bench-"))
    ports = [SINGLE, *MASTERS]
    figures = {"creates": args.creates, "cores": os.cpu_count()}
    try:
        start_node(SINGLE, data, cluster=False)
        for port in MASTERS:
            start_node(port, data, cluster=True)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in MASTERS],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       capture_output=True, check=True)
        while "cluster_state:ok" not in cli(FIRST, "CLUSTER", "INFO"):
            time.sleep(0.1)
        env = dict(os.environ, REDIS_PREFIX="rb", QUEUE_MAX_ENTRIES="1000000000")

        # One node.
        call = create_call(binary, "single", env)
        before = cpu_seconds(SINGLE)
        started = time.monotonic()
        rates = {}
        drive(SINGLE, call, args.creates, 50, rates, "single")
        wall = time.monotonic() - started
        cpu = cpu_seconds(SINGLE) - before
        figures["single"] = {"creates_per_s": rates["single"], "wall_s": wall,
                             "redis_cpu_us_per_create": cpu / args.creates * 1e6}
        log(f"one node: {rates['single']:,.0f} creates/s, "
            f"{figures['single']['redis_cpu_us_per_create']:.1f} µs Redis CPU per create")

        # Three masters, one application on each.
        ranges = common.cluster_slot_ranges(FIRST)
        calls = {}
        k = 0
        while len(calls) < len(MASTERS):
            c = create_call(binary, f"app{k}", env)
            calls.setdefault(common.slot_owner(ranges, c["slot"]), c)
            k += 1
        each = args.creates // len(MASTERS)
        before = {p: cpu_seconds(p) for p in MASTERS}
        rates = {}
        threads = [threading.Thread(target=drive, args=(p, calls[p], each, 17, rates, p))
                   for p in MASTERS]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        cpu = sum(cpu_seconds(p) - before[p] for p in MASTERS)
        total = each * len(MASTERS)
        figures["cluster"] = {"creates_per_s": total / wall, "wall_s": wall,
                              "per_master_creates_per_s": [rates[p] for p in MASTERS],
                              "redis_cpu_us_per_create": cpu / total * 1e6}
        log(f"3 masters: {total / wall:,.0f} creates/s, "
            f"{figures['cluster']['redis_cpu_us_per_create']:.1f} µs Redis CPU per create")

        # 64 shards over the masters.
        spread_env = dict(env, REDIS_CLUSTER_NODES=",".join(f"127.0.0.1:{p}" for p in MASTERS),
                          REDIS_SHARDS="64", REDIS_PREFIX="spread")
        status = common.queue_status(binary, spread_env)
        counts = {p: 0 for p in MASTERS}
        for shard in status["shards"]:
            counts[common.slot_owner(ranges, shard["slot"])] += 1
        figures["spread_64"] = [counts[p] for p in MASTERS]
        log(f"64 shards over 3 masters: {figures['spread_64']}")
    finally:
        stop_nodes(ports)
        shutil.rmtree(data, ignore_errors=True)
    write(figures)


def write(f):
    s, c = f["single"], f["cluster"]
    per_cpu = lambda x: 1e6 / x["redis_cpu_us_per_create"]
    spread = f["spread_64"]
    mean = sum(spread) / len(spread)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Redis write path: one node and a 3-master cluster — {stamp}", "",
        f"Machine: {f['cores']} cores. The create-message script driven directly with "
        f"redis-benchmark ({f['creates']:,} creates per layout), AOF on with `everysec`. "
        "Reproduce: `scripts/bench --redis-cluster`.", "",
        "| layout | creates/s | Redis CPU per create | creates per Redis CPU-second |",
        "|---|---:|---:|---:|",
        f"| one node, 50 clients | {s['creates_per_s']:,.0f} | {s['redis_cpu_us_per_create']:.1f} µs | {per_cpu(s):,.0f} |",
        f"| 3 masters, 17 clients each | {c['creates_per_s']:,.0f} | {c['redis_cpu_us_per_create']:.1f} µs | {per_cpu(c):,.0f} |",
        "",
        f"* Redis CPU per create on the cluster: {c['redis_cpu_us_per_create'] / s['redis_cpu_us_per_create']:.2f}× one node's (target: within 1.10×).",
        f"* Aggregate creates/s, 3 masters over one node: {c['creates_per_s'] / s['creates_per_s']:.2f}× "
        f"on {f['cores']} cores shared by 3 Redis processes and 3 benchmark clients. "
        "With a core per master, each master runs at its per-CPU-second rate, so 3 masters "
        f"would give about {3 * per_cpu(c) / per_cpu(s):.2f}× one node (target ≥ 2.4×); "
        "this machine cannot show that directly.",
        f"* 64 shards over 3 masters: {spread} (mean {mean:.1f}; largest deviation "
        f"{max(abs(x - mean) for x in spread) / mean * 100:.0f}%, target ±15%).",
        "",
    ]
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "redis-cluster.md").write_text("\n".join(lines))
    (out / "redis-cluster.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
