#!/usr/bin/env python3
"""Live delivery and newest-first pages on a private stack: two API processes and a
worker (release build), MariaDB and Redis from scripts/deps.

* `bench/live.rs` opens SUBSCRIBERS event streams spread over both APIs and 100 chats,
  creates messages at RATE per second through both, and reports the time from each
  `201` to its event at every subscriber (p50/p99/max), and the private memory per idle
  subscriber of each API process;
* wrk reads a newest-first page of 50 (`order=desc&limit=50`) of a chat whose newest
  messages are still pending (the worker is stopped for it), p50/p99.

    scripts/bench --live [--subscribers N] [--rate R] [--seconds S]

Ports: BENCH_LIVE_MYSQL_PORT (26306), BENCH_LIVE_REDIS_PORT (26379), BENCH_LIVE_API_PORT
(26100 and the next one). Results: bench/results/live.md (+ .json).
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import common
from common import RESULTS, ROOT, make_log

DATA = ROOT / ".data" / "bench-live"
MYSQL_PORT = int(os.environ.get("BENCH_LIVE_MYSQL_PORT", 26306))
REDIS_PORT = int(os.environ.get("BENCH_LIVE_REDIS_PORT", 26379))
API_PORT = int(os.environ.get("BENCH_LIVE_API_PORT", 26100))
APIS = [f"127.0.0.1:{API_PORT}", f"127.0.0.1:{API_PORT + 1}"]


log = make_log("live bench")


def deps(action):
    env = common.deps_env(DATA / "deps", MYSQL_PORT, REDIS_PORT, DEPS_REDIS_CLUSTER_PORT=None)
    common.deps(action, env)


def wait_http(addr, path, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        if common.http_ok(addr, path):
            return
        time.sleep(0.1)
    raise SystemExit(f"live bench: http://{addr}{path} did not answer")


def request(method, url, body=None):
    return common.http_json(method, url, body)


def wrk_page(url, seconds):
    lua = r"""
done = function(summary, latency, requests)
  io.stderr:write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"status":%d,"p50":%d,"p99":%d}\n',
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout, summary.errors.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    # Four connections: the latency of a page, not of a queue of them on a saturated box.
    out = subprocess.run(["wrk", "-t", "2", "-c", "4", "-d", f"{seconds}s", "-s", f.name, url],
                         capture_output=True, text=True)
    os.unlink(f.name)
    r = json.loads(re.search(r"WRKJSON (\{.*\})", out.stderr).group(1))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50"] / 1000,
            "p99_ms": r["p99"] / 1000, "errors": r["errors"] + r["status"]}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--soak", type=float, metavar="MINUTES",
                   help="instead: subscribers connecting and dropping (a tenth every "
                        "second) under the create rate for MINUTES; the APIs' private "
                        "memory every 10 s (bench/results/live-soak.md)")
    args = p.parse_args()
    log("building (release)")
    release = common.build_release("live")
    binary = release / "chat-system"
    live = release / "examples" / "live"
    DATA.mkdir(parents=True, exist_ok=True)
    deps("start")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_CLUSTER_NODES"}
    env.update(DATABASE_URL=f"mysql://root@127.0.0.1:{MYSQL_PORT}/chat_live_bench",
               REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}",
               REDIS_PREFIX=f"live{int(time.time())}", LOG_LEVEL="warn",
               SEARCH_INDEX_DIR=str(DATA / "search"), EVENTS_MAX_SUBSCRIBERS="100000")
    procs = []
    figures = {"subscribers": args.subscribers, "rate": args.rate, "seconds": args.seconds,
               "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    try:
        subprocess.run([str(binary), "migrate"], env=env, check=True)
        logs = open(DATA / "procs.log", "w")
        for i, api in enumerate(APIS):
            procs.append(subprocess.Popen([str(binary), "api"], env=dict(env, BIND=api),
                                          stdout=logs, stderr=logs))
        worker = subprocess.Popen([str(binary), "worker"], env=env, stdout=logs, stderr=logs)
        procs.append(worker)  # stopped at the end whichever way the run ends
        for api in APIS:
            wait_http(api, "/readyz")
        if args.soak:
            log(f"soak: {args.subscribers} subscribers, a tenth replaced every second, "
                f"{args.rate:.0f} creates/s, {args.soak:.0f} min")
            out = subprocess.run([str(live), "--apis", ",".join(APIS),
                                  "--pids", ",".join(str(p.pid) for p in procs[:len(APIS)]),
                                  "--subscribers", str(args.subscribers),
                                  "--rate", str(args.rate), "--soak", str(args.soak * 60)],
                                 capture_output=True, text=True, check=True)
            soak = json.loads(out.stdout.strip().splitlines()[-1])
            write_soak(soak, figures)
            return
        log(f"{args.subscribers} subscribers, {args.rate:.0f} creates/s for {args.seconds:.0f} s")
        out = subprocess.run([str(live), "--apis", ",".join(APIS),
                              "--pids", ",".join(str(p.pid) for p in procs[:len(APIS)]),
                              "--subscribers", str(args.subscribers), "--rate", str(args.rate),
                              "--seconds", str(args.seconds)],
                             capture_output=True, text=True, check=True)
        figures["live"] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"live: {figures['live']}")

        # Newest-first page of 50 with its newest items pending: stop the worker first.
        worker.terminate()
        worker.wait()
        app = request("POST", f"http://{APIS[0]}/applications", {"name": "pages"})
        token = app["token"]
        request("POST", f"http://{APIS[0]}/applications/{token}/chats", {})
        for i in range(200):
            request("POST", f"http://{APIS[0]}/applications/{token}/chats/1/messages",
                    {"body": f"page message {i}"})
        url = f"http://{APIS[1]}/applications/{token}/chats/1/messages?order=desc&limit=50"
        figures["page_desc_50_pending"] = wrk_page(url, 10)
        log(f"newest-first page of 50 (pending): {figures['page_desc_50_pending']}")
        worker = subprocess.Popen([str(binary), "worker"], env=env, stdout=logs, stderr=logs)
        procs.append(worker)
        deadline = time.time() + 30
        while time.time() < deadline:
            status = common.queue_status(binary, env)
            if status["length"] == 0 or all(g["pending"] == 0 and g["lag"] == 0
                                            for g in status["groups"]):
                break
            time.sleep(0.5)
        figures["page_desc_50_persisted"] = wrk_page(url, 10)
        log(f"newest-first page of 50 (persisted): {figures['page_desc_50_persisted']}")
    finally:
        common.stop_processes(procs, 30)
        deps("stop")
    write(figures)


def write_soak(soak, f):
    samples = soak["rss_anon_kib_every_10s"]
    warm = samples[len(samples) // 5:] or samples
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Live delivery soak — {stamp}", "",
        f"Machine: {f['cores']} cores (load average {f['load_before']:.1f} at the start). "
        f"{soak['subscribers']:,} subscribers over two API processes, a tenth of them "
        f"dropped and replaced every second, {soak['rate']:.0f} creates/s, for "
        f"{soak['soak_seconds'] / 60:.0f} minutes. Reproduce: `scripts/bench --live --soak "
        f"{soak['soak_seconds'] / 60:.0f} --subscribers {soak['subscribers']} --rate "
        f"{soak['rate']:.0f}`.", "",
        "Private memory (RssAnon) of both API processes together, every 10 s, in MiB:", "",
        "    " + " ".join(f"{k / 1024:.1f}" for k in samples), "",
        f"After the first fifth (warm-up): min {min(warm) / 1024:.1f}, max "
        f"{max(warm) / 1024:.1f}, last {warm[-1] / 1024:.1f} MiB; growth from the first "
        f"warm sample to the last: {(warm[-1] - warm[0]) / 1024:+.1f} MiB.", "",
    ]
    out = RESULTS
    (out / "live-soak.md").write_text("\n".join(lines))
    print("\n".join(lines))


def write(f):
    live = f["live"]
    lat = live["latency_ms"]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    pending, persisted = f["page_desc_50_pending"], f["page_desc_50_persisted"]
    lines = [
        f"# Live delivery and newest-first pages — {stamp}", "",
        f"Machine: {f['cores']} cores (load average {f['load_before']:.1f} at the start). Two API "
        "processes and a worker (release build) on one box; reproduce: "
        f"`scripts/bench --live --subscribers {f['subscribers']} --rate {f['rate']:.0f} "
        f"--seconds {f['seconds']:.0f}`.", "",
        "| figure | value | target |", "|---|---:|---:|",
        f"| subscribers (over both APIs, 100 chats) | {live['subscribers']:,} | 1,000 |",
        f"| creates/s sent (failures) | {live['creates_per_s']:,.0f} ({live['create_failures']}) | 2,000 |",
        f"| events received / expected | {live['events_received']:,} / {live['events_expected']:,} | all |",
        f"| 201 → event p50 / p99 / max | {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} ms | p99 ≤ 50 ms |",
        f"| private memory per idle subscriber (per API) | "
        f"{' / '.join(f'{k:.1f}' for k in live['idle_kib_per_subscriber'])} KiB | ≤ 16 KB |",
        f"| newest-first page of 50, newest pending: p50 / p99 | {pending['p50_ms']:.2f} / {pending['p99_ms']:.2f} ms ({pending['rps']:,.0f}/s) | p99 ≤ 3 ms |",
        f"| the same page persisted: p50 / p99 | {persisted['p50_ms']:.2f} / {persisted['p99_ms']:.2f} ms ({persisted['rps']:,.0f}/s) | p99 ≤ 3 ms |",
        "",
    ]
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "live.md").write_text("\n".join(lines))
    (out / "live.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
