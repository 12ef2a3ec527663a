#!/usr/bin/env python3
"""The benchmark behind `scripts/bench`: builds in release mode, starts a private stack
(MariaDB, Redis, one `api` and one `worker` process), loads it from a second process on
loopback with wrk, and measures the ceilings of the same machine in the same run.

Results go to bench/results/ (markdown table + SVG chart). Every phase is bounded in
time; the default run takes about 10 minutes, `--quick` about 2.

The worker runs in the kernel's idle scheduling class (`chrt --idle 0`): on one box,
the API's latency comes first and persistence takes the spare CPU. Set
BENCH_WORKER_PRIORITY=normal to measure without it, or nice10 for `nice -n 10`.

`--search` runs only the search section (also part of the full run): the adversarial
chat (20,000 messages of `"abcd cdab "` × 200, searched for `abcdabcd`, alone and while a
search of another application is measured beside 8 looping ones), and the drain of a
backlog with the CPU each part of the system spends per message. `--drain N` runs only
the drain, of N messages, with its progress every half second. `--serve-paced RATE`
offers creates at RATE per second for 20 s to `chat-system serve` and reports what each
cost: CPU by part, Redis commands, MariaDB statements. BENCH_BINARY runs another build
of `chat-system` (a path) on the same stack, to compare two builds in alternated runs.

Ports (all on 127.0.0.1), each overridable when taken: BENCH_MYSQL_PORT (default 24306)
and BENCH_REDIS_PORT (24379) for the private MariaDB and Redis, BENCH_API_PORT (3100),
BENCH_WORKER_METRICS_PORT (3101) and BENCH_PROBE_PORT (3102).

`--growth` runs the same scenarios on a small database and on one bulk-loaded to
`--growth-messages` messages in `--growth-chats` chats over `--growth-apps` applications
(default 10M / 1M / 10k), and `--idle-after-load` times how long the system takes to be
idle after chats and messages created through the API (`--load-chats`, `--load-messages`):
bench/growth.py describes both. MariaDB's buffer pool is 512 MiB, 4 GiB for `--growth`
(its data set is about 1.5 GiB); BENCH_MYSQL_BUFFER_POOL sets another size. `--growth`
turns the API's read cache off, so that its reads measure the storage path.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import common
from common import RESULTS, ROOT, http_ok, make_log, read_pid

DATA = ROOT / ".data" / "bench"


def _port(name, default):
    value = os.environ.get(name, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"bench: {name} must be a port number (1-65535), not '{value}'")
    return int(value)


MYSQL_PORT = _port("BENCH_MYSQL_PORT", 24306)
REDIS_PORT = _port("BENCH_REDIS_PORT", 24379)
API = f"127.0.0.1:{_port('BENCH_API_PORT', 3100)}"
WORKER_METRICS = f"127.0.0.1:{_port('BENCH_WORKER_METRICS_PORT', 3101)}"
PROBE = f"127.0.0.1:{_port('BENCH_PROBE_PORT', 3102)}"
PREFIX = "bench"
WORKER_PRIORITY = os.environ.get("BENCH_WORKER_PRIORITY", "idle")
PRIORITY_WRAPPERS = {"idle": ["chrt", "--idle", "0"], "nice10": ["nice", "-n", "10"], "normal": []}
if WORKER_PRIORITY not in PRIORITY_WRAPPERS:
    raise SystemExit(f"bench: BENCH_WORKER_PRIORITY must be one of {', '.join(PRIORITY_WRAPPERS)}")
WORDS = [f"w{i:03d}" for i in range(1000)]  # search vocabulary: each word in ~0.3% of bodies


log = make_log("bench")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def http(method, path, body=None, base=API):
    return common.http_json(method, f"http://{base}{path}", body)


def redis(*args):
    return common.redis_cli(REDIS_PORT, *args).strip()


def redis_commands():
    """Redis's `INFO commandstats` since the last `CONFIG RESETSTAT`: (command, calls,
    µs), most µs first."""
    found = re.findall(r"^cmdstat_([^:]+):calls=(\d+),usec=(\d+)", redis("INFO", "commandstats"), re.M)
    return sorted(((name, int(calls), int(usec)) for name, calls, usec in found), key=lambda c: -c[2])


def wait_until(what, check, limit=60.0, every=0.05):
    deadline = time.time() + limit
    while time.time() < deadline:
        if check():
            return True
        time.sleep(every)
    raise SystemExit(f"bench: timed out waiting for {what}")


# ---- wrk ----------------------------------------------------------------------------

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.stderr:write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p99":%d,"p999":%d,"max":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def wrk(name, lua, seconds, connections=64, threads=2, url=None):
    """Runs wrk with a Lua request script; returns its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua + WRK_DONE)
        script = f.name
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
           "--timeout", "5s", "-s", script, url or f"http://{API}"]
    out = subprocess.run(cmd, text=True, capture_output=True)
    os.unlink(script)
    result = common.wrk_figures(name, out.stdout, out.stderr)
    log(f"{name}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, p99.9 {result['p999_ms']:.2f} ms, "
        f"errors {result['errors']}, non-2xx {result['non2xx']}")
    return result


def lua_post(path_expr, body_expr, delay_ms=None):
    delay = f"delay = function() return {delay_ms} end\n" if delay_ms else ""
    return f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", {path_expr}, {{["Content-Type"] = "application/json"}}, {body_expr})
end
{delay}"""


def lua_post_paced(path_expr, body_expr, rate_per_thread):
    """A wrk script that offers `rate_per_thread` POSTs a second from each wrk thread,
    whatever the latency (as long as the thread has connections free): every reply's
    connection takes the thread's next time slot and waits for it (`delay`, in whole
    ms). The clock is the monotonic one, through LuaJIT's FFI. Slots more than 50 ms in
    the past are dropped, not caught up in a burst, so when every connection is busy the
    rate offered falls and the figure says so."""
    return f"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clock, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
local n = 0
local interval = {1000.0 / rate_per_thread}
local next_slot = nil
request = function()
  n = n + 1
  return wrk.format("POST", {path_expr}, {{["Content-Type"] = "application/json"}}, {body_expr})
end
delay = function()
  local now = now_ms()
  if next_slot == nil or next_slot < now - 50 then next_slot = now end
  local slot = next_slot
  next_slot = next_slot + interval
  if slot - now < 1 then return 0 end
  return math.floor(slot - now)
end
"""


def lua_get(path_expr, delay_ms=None):
    delay = f"delay = function() return {delay_ms} end\n" if delay_ms else ""
    return f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function() return wrk.format("GET", {path_expr}) end
{delay}"""


def match_cache_lookups():
    """The API's search match-cache lookups so far: (hits, misses)."""
    found = dict(re.findall(r'^search_match_cache_lookups_total\{outcome="(\w+)"\} (\S+)$',
                            common.metrics_text(API, timeout=5), re.M))
    return float(found.get("hit", 0)), float(found.get("miss", 0))


def log_match_cache(before, what):
    """Logs the match cache's lookups since `before`; returns the lookups so far."""
    now = match_cache_lookups()
    log(f"search match cache, {what}: {now[0] - before[0]:,.0f} parts answered from it, "
        f"{now[1] - before[1]:,.0f} scanned")
    return now


def read_cache_lookups():
    """The API's read-cache lookups so far: (hits, misses)."""
    found = dict(re.findall(r'^read_cache_lookups_total\{outcome="(\w+)"\} (\S+)$',
                            common.metrics_text(API, timeout=5), re.M))
    return float(found.get("hit", 0)), float(found.get("miss", 0))


def read_scenario(name, path_expr, seconds, paced_rate=None):
    """Maximum throughput (64 connections), then latency at a third of it, or at
    `paced_rate` requests/s (16 connections, paced): a saturated closed loop only
    measures its own queueing. The saturated run's name carries the share of its reads
    the API's read cache answered."""
    before = read_cache_lookups()
    peak = wrk(name, lua_get(path_expr), seconds)
    hits, misses = (a - b for a, b in zip(read_cache_lookups(), before))
    if hits + misses:
        peak["scenario"] += f" (read cache: {hits / (hits + misses):.0%} hits)"
    conns = 16
    delay = max(1, round(conns * 1000 / max(paced_rate or peak["rps"] / 3, 1)))
    paced = wrk(f"{name} at ~{conns * 1000 / delay:,.0f}/s", lua_get(path_expr, delay), seconds, connections=conns)
    return [peak, paced]


def body_expr():
    words = ",".join(f'"{w}"' for w in WORDS)
    return ('(function() local W = {' + words + '} '
            'return string.format(\'{"body":"message %d %s %s %s lorem ipsum"}\', n, '
            'W[math.random(#W)], W[math.random(#W)], W[math.random(#W)]) end)()')


# ---- metrics ------------------------------------------------------------------------

def scrape(base):
    text = common.metrics_text(base, timeout=5)
    buckets = {}
    for line in text.splitlines():
        m = re.match(r'(\w+)_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            buckets.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
    return buckets


def quantile(before, after, metric, q):
    """Quantile of the observations made between two scrapes, interpolated in buckets."""
    b = dict(before.get(metric, []))
    rows = [(le, c - b.get(le, 0.0)) for le, c in after.get(metric, [])]
    if not rows or rows[-1][1] <= 0:
        return None
    total, target, prev_le, prev_c = rows[-1][1], rows[-1][1] * q, 0.0, 0.0
    for le, c in rows:
        if c >= target:
            if le == float("inf"):
                return prev_le
            frac = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_c = le, c
    return prev_le


def queue_status(tokens=()):
    """`chat-system queue-status` of the bench stack (key names are never written here)."""
    env = dict(os.environ, DATABASE_URL=f"mysql://root@127.0.0.1:{MYSQL_PORT}/chat_bench",
               REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}", REDIS_PREFIX=PREFIX, LOG_LEVEL="warn")
    return common.queue_status(BINARY, env, tokens)


def group_lag(group):
    """Entries of the stream `group` has not finished with (over every shard)."""
    g = next((g for g in queue_status()["groups"] if g["name"] == group), None)
    return 0 if g is None else g["pending"] + g["lag"]


def messages_in_chat(token, chat):
    """The chat's message counter in Redis (0 when it has none yet)."""
    counters = queue_status([token])["counters"][token]["messages"]
    return int(counters.get(str(chat)) or 0)


def rss_kib(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    cur = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return hwm, cur


def anon_kib(pid):
    """Private memory (heap, stacks): RSS without the file-backed pages, which for these
    processes are mostly the memory-mapped search index, shared with the page cache."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(re.search(r"RssAnon:\s+(\d+)", status).group(1))


class PeakMemory:
    """Samples the private memory of the api and worker processes every 0.5 s."""

    def __init__(self, stack):
        self.peaks = {}
        self._stack = stack
        self._sampler = _Sampler(self._sample)

    ROLES = {"api": "api", "worker": "worker_load", "worker2": "worker_drain", "serve": "serve"}

    def _sample(self):
        for name, proc in list(self._stack.procs.items()):
            role = self.ROLES.get(name, name)
            try:
                self.peaks[role] = max(self.peaks.get(role, 0), anon_kib(proc.pid))
            except OSError:
                pass  # the process stopped between the listing and the reading

    def stop(self):
        self._sampler.stop()


# ---- CPU per part of the system ------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The search index's own threads in the worker (Tantivy names them; a name is cut at 15
# characters): indexing, segment merges, the stored-body compressor. The rest of the
# worker is persisting, reading the queue and preparing documents.
INDEX_THREADS = ("thrd-tantivy", "merge_thread", "segment_update", "docstore-compr")


def _ticks(stat_path):
    try:
        fields = pathlib.Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _index_threads(pid):
    """CPU ticks of each of a process's search index threads, by thread id."""
    found = {}
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(INDEX_THREADS):
            found[task.name] = _ticks(task / "stat")
    return found


def cpu_ticks(stack, parts=("api", "worker", "redis", "mysql")):
    """CPU ticks so far of each of `parts`: the api process, the worker process(es),
    Redis, MariaDB."""
    got = {}
    for name, proc in stack.procs.items():
        part = "api" if name == "api" else "worker"
        if part in parts:
            got[part] = got.get(part, 0) + _ticks(f"/proc/{proc.pid}/stat")
    for name, pidfile in (("redis", DATA / "deps" / "redis" / "redis.pid"),
                          ("mysql", DATA / "deps" / "mysql" / "mysqld.pid")):
        pid = read_pid(pidfile)
        if pid and name in parts:
            got[name] = _ticks(f"/proc/{pid}/stat")
    return got


class CpuMeter:
    """CPU spent by each part of the system between `start` and `per_message`.

    Tantivy ends its indexing threads at each commit and starts new ones, and a thread's
    time leaves `/proc` with it: the index's threads are sampled every 0.1 s, and each
    counts with the last figure seen (a thread that ends loses at most its last 0.1 s).
    The rest of the worker is its process total less those threads."""

    def __init__(self, stack):
        self._stack = stack
        self._index = {}  # (pid, tid) -> [ticks when first seen, ticks when last seen]
        self._sampler = None

    def _sample_index(self):
        for name, proc in list(self._stack.procs.items()):
            if name == "api":
                continue
            for tid, ticks in _index_threads(proc.pid).items():
                seen = self._index.setdefault((proc.pid, tid), [ticks if self._started else 0, ticks])
                seen[1] = ticks

    def _snapshot(self):
        return cpu_ticks(self._stack)

    def start(self):
        self._started = False
        self._sample_index()  # threads alive now count from their current figure
        self._started = True
        self._before = self._snapshot()
        self._sampler = _Sampler(self._sample_index, every=0.1)
        return self

    def per_message(self, messages):
        """Microseconds of CPU per message, by part."""
        self._sampler.stop()
        self._sample_index()
        after = self._snapshot()
        ticks = {name: after[name] - self._before.get(name, 0) for name in after}
        index = sum(last - first for first, last in self._index.values())
        if "worker" in ticks:
            ticks["worker: search index threads"] = index
            ticks["worker: other threads (persist, queue, documents)"] = ticks.pop("worker") - index
        return {name: t / CLOCK_TICKS * 1e6 / max(messages, 1) for name, t in ticks.items()}


def log_cpu(what, cpu):
    log(f"CPU per message, {what}: " + ", ".join(f"{k} {v:,.0f} µs" for k, v in cpu.items()))


ADVERSARIAL_BODY = "abcd cdab " * 200
ADVERSARIAL_MESSAGES = 20_000


def lua_new_adversarial_terms(path_prefix, start):
    """A wrk script whose every request searches the adversarial chat for a query it has
    not searched for before (from `start` on), so that the search's match cache cannot
    answer it: the worst case of an attacker who varies the term. Each term is a run of
    `abcdabcd...` (its every gram is in the chat's bodies, the term in none of them): one
    of 4 rotations × 248 lengths, then a second such term of one of 248 lengths (246,016
    queries before one repeats)."""
    return f"""
local n = {start}
local run = string.rep("abcd", 70)
request = function()
  n = n + 1
  local r = n % 4
  local len = 5 + math.floor(n / 4) % 248
  local q = string.sub(run, r + 1, r + len)
  local k = math.floor(n / 992) % 248
  if k > 0 then q = q .. "%20" .. string.sub(run, 1, 4 + k) end
  return wrk.format("GET", "{path_prefix}" .. q)
end
"""


def search_section(stack, d):
    """The adversarial search chat, and the search of another application beside it."""
    results, figures = [], {}
    adversarial = http("POST", "/applications", {"name": "adversarial search"})["token"]
    for _ in range(2):
        http("POST", f"/applications/{adversarial}/chats", {"title": "adversarial"})
    log(f"queueing the adversarial chat: {ADVERSARIAL_MESSAGES:,} messages of {len(ADVERSARIAL_BODY):,} characters")
    fill_backlog(adversarial, ADVERSARIAL_MESSAGES, ADVERSARIAL_BODY)  # chat 2
    other = http("POST", "/applications", {"name": "normal search"})["token"]
    http("POST", f"/applications/{other}/chats", {"title": "normal"})
    http("POST", f"/applications/{other}/chats/1/messages", {"body": "one normal message"})
    wait_until("the adversarial chat to be indexed",
               lambda: group_lag("persist") == 0 and group_lag("index") == 0, 600, 0.2)
    adversarial_path = f'"/applications/{adversarial}/chats/2/messages/search?q=abcdabcd"'
    adversarial_prefix = f"/applications/{adversarial}/chats/2/messages/search?q="
    normal_path = f'"/applications/{other}/chats/1/messages/search?q=normal"'
    lookups = match_cache_lookups()
    alone = wrk("search: adversarial chat, q=abcdabcd, one client", lua_get(adversarial_path), d,
                connections=1, threads=1)
    results.append(alone)
    figures["adversarial_p99_ms"] = alone["p99_ms"]
    lookups = log_match_cache(lookups, "q=abcdabcd again and again")
    # The same search again is answered from the match cache once its first scan is
    # kept; a query never searched before is not.
    new_terms = wrk("search: adversarial chat, a new query each search, one client",
                    lua_new_adversarial_terms(adversarial_prefix, 0), d, connections=1, threads=1)
    results.append(new_terms)
    figures["adversarial_new_terms_p99_ms"] = new_terms["p99_ms"]
    lookups = log_match_cache(lookups, "a new query each search")
    # 8 adversarial searches, each for a new query, loop (for longer than the measure)
    # while one client searches its one message in another application.
    looping = {}
    loop = threading.Thread(target=lambda: looping.update(
        wrk("(8 adversarial searches looping, a new query each)",
            lua_new_adversarial_terms(adversarial_prefix, 100_000), d + 2, connections=8, threads=1)))
    loop.start()
    time.sleep(1)  # the loop's connections are open and busy before the measure starts
    beside = wrk("search: one message in another application, 8 adversarial searches looping",
                 lua_get(normal_path), d, connections=1, threads=1)
    loop.join()
    results.append(beside)
    if looping:
        results.append(looping)
    figures["normal_beside_adversarial_p99_ms"] = beside["p99_ms"]
    return results, figures


def group_lags():
    """(persist, index): entries each group has not finished with, from one status."""
    groups = {g["name"]: g["pending"] + g["lag"] for g in queue_status()["groups"]}
    return groups.get("persist", 0), groups.get("index", 0)


def slope(points):
    """Least-squares slope of (t, y) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(y for _, y in points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


def sustained_at(base, probe, fraction, seconds):
    """Creates offered at `fraction` of the HTTP+Redis probe's rate for `seconds`, the
    worker persisting and indexing beside the API.

    Both groups' queues are sampled every 0.5 s. Over the second half of the run (the
    first is warm-up), a queue growing by g entries/s means that the system finishes g/s
    fewer messages than it accepts: the rate persisted and indexed is the accepted rate
    less the growth of the faster-growing queue. wrk offers the rate in time slots
    (`lua_post_paced`), with connections enough for 30 ms of latency: the rate offered
    is the rate asked for unless the latency goes past that."""
    offered = probe * fraction
    threads = 2
    conns = max(16, round(offered * 0.030))
    samples = []
    sampler = _Sampler(lambda: samples.append((time.time(), *group_lags())))
    result = wrk(f"sustained: creates offered at {offered:,.0f}/s ({fraction:g}× probe) for {seconds}s",
                 lua_post_paced(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr(), offered / threads),
                 seconds, connections=conns, threads=threads)
    sampler.stop()
    late = [s for s in samples if samples and s[0] >= samples[0][0] + seconds / 2]
    growth = {"persist": slope([(t, p) for t, p, _ in late]), "index": slope([(t, i) for t, _, i in late])}
    done = max(0.0, result["rps"] - max(0.0, *growth.values()))
    log(f"sustained at {fraction:g}×: accepted {result['rps']:,.0f}/s; queues grew by {growth['persist']:,.0f}/s "
        f"(persist) and {growth['index']:,.0f}/s (index) over the last {seconds / 2:g}s; persisted and indexed "
        f"{done:,.0f}/s = {done / probe:.2f}× probe")
    return {"result": result, "fraction": fraction, "offered": offered, "rps": done, "ratio": done / probe,
            "growth_persist": growth["persist"], "growth_index": growth["index"],
            "queue_end": samples[-1][1:] if samples else None,
            # Kept up: neither queue grew by more than 2% of what was accepted.
            "kept_up": max(growth.values()) <= 0.02 * result["rps"]}


SUSTAINED_FRACTIONS = (0.5, 0.4, 0.3, 0.2)


def sustained(base, probe, seconds):
    """The target's rate first (half the probe); if the system does not keep up with it,
    lower rates in turn, each after the queues have drained, down to the first it keeps
    up with: the highest sustained rate, to a tenth of the probe. Returns the first
    step's figures, with `held` (the highest step kept up with, or None) and `steps`."""
    steps = []
    for fraction in SUSTAINED_FRACTIONS:
        wait_until("the queues to drain", lambda: group_lag("persist") < 1000 and group_lag("index") < 1000, 300, 0.2)
        steps.append(sustained_at(base, probe, fraction, seconds))
        if steps[-1]["kept_up"]:
            break
    first = dict(steps[0])
    first["held"] = next((s for s in steps if s["kept_up"]), None)
    first["steps"] = steps
    return first


def drain_with_cpu(stack, token, count, name):
    """Stops the worker, queues `count` messages, starts a worker and times the drain,
    with the CPU each part spends per message. Returns (persist/s, index/s, cpu, backlog,
    progress): progress is (seconds since the draining worker started, entries the
    persisting group has left, entries the indexing group has left), every 0.1 s."""
    stack.stop("worker")
    log(f"queueing a backlog of {count:,} messages")
    fill_backlog(token, count)
    backlog = group_lag("persist")
    left = {g["name"]: g["pending"] for g in queue_status()["groups"]}
    log(f"backlog: {backlog:,} entries; delivered to the stopped worker and not acknowledged: "
        + ", ".join(f"{n} {p:,}" for n, p in sorted(left.items())))
    wait_until("Redis's append-only file rewrite", lambda: "aof_rewrite_in_progress:0" in redis("INFO", "persistence"), 300, 0.2)
    redis("CONFIG", "RESETSTAT")  # Redis's command costs from the draining worker's start
    stack.start(name, "worker", WORKER_METRICS_BIND=WORKER_METRICS)
    wait_until("the draining worker", lambda: http_ok(WORKER_METRICS), 60, 0.02)
    cpu = CpuMeter(stack).start()
    start = time.time()
    persisted_s, timeline = None, []
    # Both groups from one status every 0.1 s: each status is a process of its own,
    # whose CPU the drain would otherwise share.
    while True:
        persist, index = group_lags()
        elapsed = time.time() - start  # when the status was known
        timeline.append((elapsed, persist, index))
        if persist == 0 and persisted_s is None:
            persisted_s = elapsed
        if persist == 0 and index == 0:
            indexed_s = elapsed
            break
        if elapsed > 900:
            raise SystemExit("bench: timed out waiting for the backlog to be persisted and indexed")
        time.sleep(0.1)
    per_message = cpu.per_message(backlog)
    log(f"backlog: persisted at {backlog / persisted_s:,.0f}/s, indexed at {backlog / indexed_s:,.0f}/s")
    log_cpu("backlog drain", per_message)
    log("Redis commands per message, backlog drain (calls, µs in Redis): " + ", ".join(
        f"{name} {calls / backlog:.3f}, {usec / backlog:.2f} µs" for name, calls, usec in redis_commands()[:8]))
    return backlog / persisted_s, backlog / indexed_s, per_message, backlog, timeline


def publish(name, lines):
    """Writes `lines` to bench/results/`name` and prints them."""
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)


def mysql_counters(names):
    """MariaDB's global status counters of these names."""
    out = run(common.mariadb_argv(MYSQL_PORT, "-N", "-e", "SHOW GLOBAL STATUS WHERE Variable_name IN ("
                                  + ", ".join(f"'{n}'" for n in names) + ")"))
    return {name: int(value) for name, value in (line.split("\t") for line in out.splitlines() if line)}


def serve_paced(stack, base, rate, seconds=20):
    """`--serve-paced RATE`: creates offered at RATE per second for `seconds` to
    `chat-system serve`, then drained; the CPU each create cost every part, Redis's
    commands and MariaDB's statements per create. bench/results/serve-paced.md."""
    stack.stop("api")
    stack.stop("worker")
    stack.start("serve", "serve", BIND=API)
    wait_until("chat-system serve", lambda: http_ok(API))
    time.sleep(2)  # the worker's first reads
    redis("CONFIG", "RESETSTAT")
    statements = ("Com_stmt_prepare", "Com_stmt_execute", "Com_commit")
    before = mysql_counters(statements)
    cpu = CpuMeter(stack).start()
    lua = lua_post_paced(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr(), rate / 2)
    result = wrk(f"create message, offered {rate:,}/s to chat-system serve", lua, seconds)
    wait_until("the queues to drain", lambda: group_lags() == (0, 0), 300, 0.2)
    accepted = result["requests"]
    per_create = cpu.per_message(accepted)
    per_create["serve: other threads (API, persist, queue, documents)"] = per_create.pop(
        "worker: other threads (persist, queue, documents)")
    after = mysql_counters(statements)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Creates paced to chat-system serve — {stamp}", "",
             f"Offered {rate:,}/s for {seconds} s: {result['rps']:,.0f}/s accepted, p50 {result['p50_ms']:.2f} ms, "
             f"p99 {result['p99_ms']:.2f} ms, p99.9 {result['p999_ms']:.2f} ms, errors {result['errors']}, "
             f"non-2xx {result['non2xx']}; all persisted and indexed before the figures were taken.", "",
             "| CPU per create | µs |", "|---|---:|"]
    lines += [f"| {part} | {us:,.1f} |" for part, us in per_create.items()]
    lines += ["", "| Redis command | calls per create | µs per create |", "|---|---:|---:|"]
    lines += [f"| {name} | {calls / accepted:.3f} | {usec / accepted:.2f} |" for name, calls, usec in redis_commands()[:10]]
    lines += ["", "| MariaDB | count | per transaction |", "|---|---:|---:|"]
    commits = max(after["Com_commit"] - before["Com_commit"], 1)
    lines += [f"| {name} | {after[name] - before[name]:,} | {(after[name] - before[name]) / commits:.2f} |" for name in statements]
    lines += ["", f"Reproduce: `scripts/bench --serve-paced {rate}`."]
    publish("serve-paced.md", lines)


def drain_only(stack, token, count):
    """`--drain N`: a backlog of N messages drained by a fresh worker, with the CPU per
    message and the drain's progress, written to bench/results/drain.md."""
    persist_rps, index_rps, cpu, backlog, progress = drain_with_cpu(stack, token, count, "worker")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Backlog drain — {stamp}", "", "| measure | figure | target |", "|---|---:|---|"]
    lines += search_figure_rows(dict(drain_persist_rps=persist_rps, drain_index_rps=index_rps,
                                     cpu_drain=cpu, backlog=backlog), searched=False)
    lines += ["", "Progress, every half second: entries left to persist and to index.", "",
              "| s | to persist | to index |", "|---:|---:|---:|"]
    shown = -1
    for t, persist, index in progress:
        if int(t * 2) != shown or (persist == 0 and index == 0):
            shown = int(t * 2)
            lines.append(f"| {t:.1f} | {persist:,} | {index:,} |")
    lines += ["", f"Reproduce: `scripts/bench --drain {count}`."]
    publish("drain.md", lines)


def search_only(stack, token, quick):
    """`--search`: the search section and a backlog drain, written to bench/results/search.md."""
    d = 4 if quick else 10
    results, figures = search_section(stack, d)
    persist_rps, index_rps, cpu, backlog, _ = drain_with_cpu(stack, token, 200_000, "worker")
    figures.update(drain_persist_rps=persist_rps, drain_index_rps=index_rps, cpu_drain=cpu, backlog=backlog)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Search benchmark — {stamp}", "",
             "| scenario | req/s | p50 ms | p99 ms | p99.9 ms | errors | non-2xx |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | "
              f"{r['errors']} | {r['non2xx']} |" for r in results]
    lines += ["", "| measure | figure | target |", "|---|---:|---|"] + search_figure_rows(figures)
    lines += ["", "Reproduce: `scripts/bench --search`."]
    text = "\n".join(lines) + "\n"
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.md").write_text(text)
    (out / "search.json").write_text(json.dumps({"results": results, "figures": figures}, indent=1))
    print(text)


def sustained_row(first):
    if not first:
        return ""
    held = first.get("held")
    kept = (f"the queues kept up with what was accepted when offered {held['fraction']:g}× "
            f"({held['result']['rps']:,.0f}/s)" if held
            else f"the queues grew at each of {', '.join(f'{f:g}×' for f in SUSTAINED_FRACTIONS)}")
    return (f"| sustained: creates persisted and indexed / HTTP+Redis ceiling, offered 0.5× (accepted "
            f"{first['result']['rps']:,.0f}/s; queues grew {first['growth_persist']:,.0f}/s persist, "
            f"{first['growth_index']:,.0f}/s index); {kept} | {first['ratio']:.2f}× | ≥ 0.5× |")


def search_figure_rows(f, searched=True):
    rows = [f"| search, adversarial chat alone, q=abcdabcd again and again: p99 | "
            f"{fmt(f.get('adversarial_p99_ms'), ' ms', 2)} | ≤ 10 ms |",
            f"| search, adversarial chat alone, a new query each search: p99 | "
            f"{fmt(f.get('adversarial_new_terms_p99_ms'), ' ms', 2)} | ≤ 10 ms |",
            f"| search in another application, 8 adversarial searches looping: p99 | "
            f"{fmt(f.get('normal_beside_adversarial_p99_ms'), ' ms', 2)} | ≤ 10 ms |"] if searched else []
    if f.get("drain_index_rps"):
        rows.append(f"| backlog of {f.get('backlog', 0):,}: persisted / indexed | {fmt(f.get('drain_persist_rps'), '/s')} / "
                    f"{fmt(f.get('drain_index_rps'), '/s')} | indexed ≥ 60,000/s |")
    for what in ("cpu_create", "cpu_drain"):
        for part, us in (f.get(what) or {}).items():
            label = "creates with the worker beside the API" if what == "cpu_create" else "backlog drain"
            rows.append(f"| CPU per message, {label}: {part} | {us:,.0f} µs | |")
    return rows


# ---- the stack ----------------------------------------------------------------------

class Stack:
    def __init__(self, binary):
        self.binary = binary
        self.procs = {}
        self.env = dict({k: v for k, v in os.environ.items() if k != "REDIS_CLUSTER_NODES"},
                        DATABASE_URL=f"mysql://root@127.0.0.1:{MYSQL_PORT}/chat_bench",
                        REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}",
                        REDIS_PREFIX=PREFIX, LOG_LEVEL="warn",
                        SEARCH_INDEX_DIR=str(DATA / "search"),
                        # The run queues a backlog of a million messages on top of what
                        # the create scenarios left: above the default bound of writes
                        # waiting to be persisted, which would refuse part of it.
                        QUEUE_MAX_ENTRIES="10000000",
                        # The backlog's entries are minutes old by the time the indexer
                        # reaches them: measure indexing from the stream, not the
                        # catch-up from MySQL that an older backlog would get.
                        INDEX_LAG_MAX="10m",
                        COUNTS_SYNC_INTERVAL="10s")

    def start(self, name, *args, **extra):
        env = dict(self.env, **extra)
        logf = open(DATA / f"{name}.log", "w")
        wrapper = PRIORITY_WRAPPERS[WORKER_PRIORITY] if args[0] == "worker" else []
        self.procs[name] = subprocess.Popen([*wrapper, self.binary, *args], env=env, stdout=logf, stderr=logf)

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p:
            common.stop_process(p, 20)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="about 2 minutes instead of 10")
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="instead: creates at 60%% of the maximum rate for MINUTES (e.g. 10), "
                             "sampling RSS and the queue")
    parser.add_argument("--search", action="store_true",
                        help="instead: only the search section (adversarial chat, backlog drain "
                             "with CPU per message); bench/results/search.md")
    parser.add_argument("--drain", type=int, metavar="N",
                        help="instead: only the drain of a backlog of N messages (e.g. 1000000) by a "
                             "fresh worker, with its progress and the CPU per message; bench/results/drain.md")
    parser.add_argument("--serve-paced", type=int, metavar="RATE",
                        help="instead: creates offered at RATE per second (e.g. 7000) for 20 s to chat-system "
                             "serve, with the CPU, Redis commands and MariaDB statements per create; "
                             "bench/results/serve-paced.md")
    parser.add_argument("--growth", action="store_true",
                        help="instead: the scenarios on a small and on a bulk-loaded grown database "
                             "(bench/growth.py); bench/results/growth.md")
    parser.add_argument("--growth-messages", type=int, default=10_000_000, metavar="N",
                        help="messages of the grown database (default 10,000,000)")
    parser.add_argument("--growth-chats", type=int, default=1_000_000, metavar="N",
                        help="chats of the grown database (default 1,000,000)")
    parser.add_argument("--growth-apps", type=int, default=10_000, metavar="N",
                        help="applications of the grown database (default 10,000)")
    parser.add_argument("--idle-after-load", action="store_true",
                        help="instead: chats then messages created through the API, and the time from the "
                             "end of that load until the system is idle; bench/results/idle-after-load.md")
    parser.add_argument("--load-chats", type=int, default=200_000, metavar="N",
                        help="chats created by --idle-after-load (default 200,000)")
    parser.add_argument("--load-messages", type=int, default=1_000_000, metavar="N",
                        help="messages created by --idle-after-load (default 1,000,000)")
    parser.add_argument("--idle-limit", type=int, default=300, metavar="SECONDS",
                        help="--idle-after-load waits at most this long for the system to be idle (300)")
    args = parser.parse_args()
    if args.drain is not None and args.drain < 1:
        raise SystemExit("bench: --drain needs a number of messages of at least 1")
    if args.serve_paced is not None and args.serve_paced < 2:
        raise SystemExit("bench: --serve-paced needs a rate of at least 2 creates per second")
    if args.growth and not (args.growth_apps > 10 and args.growth_chats >= args.growth_apps
                            and args.growth_messages >= args.growth_chats):
        raise SystemExit("bench: --growth needs more than 10 applications, at least one chat per "
                         "application and at least one message per chat")
    quick = args.quick
    d = 4 if quick else 12               # seconds per throughput scenario
    steady_s = 15 if quick else 60       # the steady phase
    backlog = 200_000 if quick else 1_000_000
    search_corpus = 100_000

    # A server already on one of these ports would answer in place of ours (checked
    # before the build, which takes minutes; MariaDB and Redis: scripts/deps checks).
    for name, addr in (("BENCH_API_PORT", API), ("BENCH_WORKER_METRICS_PORT", WORKER_METRICS),
                       ("BENCH_PROBE_PORT", PROBE)):
        if _port_open(addr):
            raise SystemExit(f"bench: {addr} is already taken; stop what listens there, "
                             f"or set {name} to a free port")

    log("building (release)")
    release = common.build_release("probe")
    # BENCH_BINARY runs another build of chat-system on the same stack and scripts: two
    # builds compared in alternated runs (this machine's speed moves between runs).
    binary = os.environ.get("BENCH_BINARY") or str(release / "chat-system")
    global BINARY
    BINARY = binary
    probe_bin = str(release / "examples" / "probe")
    if not shutil.which("wrk"):
        log("installing wrk")
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq",
                        "--no-install-recommends", "wrk"], check=True)

    DATA.mkdir(parents=True, exist_ok=True)
    # The growth scenario's 10M messages (about 1.1 GiB of rows, plus the secondary
    # index) fit a 4 GiB buffer pool, as they would on a database server sized for them.
    buffer_pool = os.environ.get("BENCH_MYSQL_BUFFER_POOL", "4G" if args.growth else "512M")
    deps_env = common.deps_env(DATA / "deps", MYSQL_PORT, REDIS_PORT,
                               DEPS_MYSQL_PORT_VAR="BENCH_MYSQL_PORT",
                               DEPS_REDIS_PORT_VAR="BENCH_REDIS_PORT",
                               DEPS_MYSQL_BUFFER_POOL=buffer_pool)
    common.deps("start", deps_env, quiet=False)
    stack = Stack(binary)
    if args.growth:
        # What growth costs the storage path: every read goes to MySQL. (The small data
        # set would otherwise sit whole in the API's read cache, the grown one not.)
        stack.env["READ_CACHE_SIZE"] = "0"
    results, figures = [], {}
    try:
        redis("FLUSHALL")
        run(common.mariadb_argv(MYSQL_PORT, "-e", "DROP DATABASE IF EXISTS chat_bench"))
        shutil.rmtree(DATA / "search", ignore_errors=True)
        subprocess.run([binary, "migrate"], env=stack.env, check=True)
        stack.start("worker", "worker", WORKER_METRICS_BIND=WORKER_METRICS)
        stack.start("api", "api", BIND=API)
        wait_until("the api", lambda: http_ok(API))
        wait_until("the worker", lambda: http_ok(WORKER_METRICS))
        if args.growth or args.idle_after_load:
            import growth
            this = sys.modules[__name__]
            return (growth.growth if args.growth else growth.idle_after_load)(this, stack, args)

        memory = PeakMemory(stack)
        token = http("POST", "/applications", {"name": "bench"})["token"]
        for _ in range(1000):
            http("POST", f"/applications/{token}/chats", {"title": "bench"})
        base = f"/applications/{token}/chats"
        if args.soak:
            return soak(stack, base, args.soak)
        if args.search:
            return search_only(stack, token, quick)
        if args.drain is not None:
            return drain_only(stack, token, args.drain)
        if args.serve_paced is not None:
            return serve_paced(stack, base, args.serve_paced)

        # Ceilings, same machine, same run.
        results.append(wrk("ceiling: HTTP (GET /healthz)", lua_get('"/healthz"'), d))
        figures["http_ceiling"] = results[-1]["rps"]
        figures["redis_ceiling"] = redis_ceiling()
        probe = subprocess.Popen([probe_bin, PROBE, f"redis://127.0.0.1:{REDIS_PORT}", "probe"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until("the probe", lambda: _port_open(PROBE))
            results.append(wrk("ceiling: HTTP+Redis probe (POST, one EVALSHA)",
                               lua_post('"/probe/" .. math.random(1000)', body_expr()), d,
                               url=f"http://{PROBE}"))
            figures["probe_ceiling"] = results[-1]["rps"]
        finally:
            probe.terminate()
            probe.wait()
            subprocess.run(f"redis-cli -p {REDIS_PORT} --scan --pattern 'probe:*' | xargs -r -n 1000 redis-cli -p {REDIS_PORT} DEL > /dev/null",
                           shell=True, check=True)

        # Creates through the API alone, right after the probe and in the same state of
        # the machine: with no worker beside it, as the probe had none, this is the
        # figure to hold against the HTTP+Redis ceiling. The worker then drains them.
        stack.stop("worker")
        alone = wrk("create message, API alone (worker stopped)",
                    lua_post(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr()), d)
        results.append(alone)
        figures["create_alone_rps"] = alone["rps"]
        stack.start("worker", "worker", WORKER_METRICS_BIND=WORKER_METRICS)
        wait_until("the queue to drain", lambda: group_lag("persist") == 0 and group_lag("index") == 0, 300, 0.2)

        # Throughput scenarios, the worker persisting and indexing beside the API.
        results.append(wrk("create chat", lua_post(f'"{base}"', "'{\"title\":\"t\"}'"), d))
        cpu = CpuMeter(stack).start()
        results.append(wrk("create message, 1,000 chats",
                           lua_post(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr()), d))
        figures["create_rps"] = results[-1]["rps"]
        # What the worker does for these creates, it may finish after the measure: the
        # CPU is taken once the queue is drained.
        wait_until("the queue to drain", lambda: group_lag("persist") == 0 and group_lag("index") == 0, 300, 0.2)
        figures["cpu_create"] = cpu.per_message(results[-1]["requests"])
        log_cpu("creates with the worker beside the API", figures["cpu_create"])
        hot = wrk("create message, one hot chat", lua_post(f'"{base}/1/messages"', body_expr()), d)
        results.append(hot)
        # Top the hot chat up to the search corpus size, then wait for persistence and indexing.
        have = messages_in_chat(token, 1)
        if have < search_corpus:
            wrk("(fill the search chat)", lua_post(f'"{base}/1/messages"', body_expr()),
                max(2, int((search_corpus - have) / max(hot["rps"], 1000) * 1.3) + 1))
        wait_until("the queue to drain", lambda: group_lag("persist") == 0 and group_lag("index") == 0, 300, 0.2)
        corpus = messages_in_chat(token, 1)
        figures["search_corpus"] = corpus

        # Reads spread evenly over the whole chat (far more than the API's read cache
        # holds), then over its newest 1,000 messages, where a chat's readers mostly are.
        results += read_scenario("get message", f'"{base}/1/messages/" .. math.random({corpus})', d)
        figures["get_rps"] = results[-2]["rps"]
        results += read_scenario("get message, newest 1,000",
                                 f'"{base}/1/messages/" .. ({corpus} - math.random(1000) + 1)', d)
        figures["get_recent_rps"] = results[-2]["rps"]
        results += read_scenario("list page (50)",
                                 f'"{base}/1/messages?limit=50&after=" .. math.random({corpus - 50})', d)
        figures["page_rps"] = results[-2]["rps"]
        results += read_scenario("list page (50), newest first",
                                 f'"{base}/1/messages?limit=50&order=desc"', d)
        figures["page_recent_rps"] = results[-2]["rps"]
        words = ",".join(f'"{w}"' for w in WORDS)
        results += read_scenario(f"search, chat of {corpus:,} messages",
                                 f'(function() local W = {{{words}}} return "{base}/1/messages/search?q=" .. W[math.random(#W)] end)()', d)

        # Steady creates at half the maximum rate: latency, lags, queue.
        rate = figures["create_rps"] / 2
        conns = 64
        delay = max(1, round(conns * 1000 / rate))
        before = scrape(WORKER_METRICS)
        queue_samples = []
        sampler = _Sampler(lambda: queue_samples.append(group_lag("persist")))
        steady = wrk(f"steady creates at ~{conns * 1000 / delay:,.0f}/s for {steady_s}s",
                     lua_post(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr(), delay_ms=delay),
                     steady_s, connections=conns)
        sampler.stop()
        time.sleep(1.5)
        after = scrape(WORKER_METRICS)
        results.append(steady)
        figures["steady"] = steady
        for metric in ("persist_lag_seconds", "index_lag_seconds"):
            for q in (0.5, 0.99):
                v = quantile(before, after, metric, q)
                figures[f"{metric}_p{int(q * 100)}"] = v * 1000 if v is not None else None
        figures["queue_max"] = max(queue_samples or [0])
        figures["queue_end"] = queue_samples[-1] if queue_samples else 0
        figures["queue_samples"] = len(queue_samples)

        # Mixed load at a fixed rate: 70% creates, 20% gets, 10% list pages.
        mixed_lua = f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
local n = 0
request = function()
  n = n + 1
  local r = math.random(10)
  if r <= 7 then
    return wrk.format("POST", "{base}/" .. math.random(1000) .. "/messages", {{["Content-Type"] = "application/json"}}, '{{"body":"mixed ' .. n .. '"}}')
  elseif r <= 9 then
    return wrk.format("GET", "{base}/1/messages/" .. math.random({corpus}))
  else
    return wrk.format("GET", "{base}/1/messages?limit=50&after=" .. math.random({corpus - 50}))
  end
end
delay = function() return {delay} end
"""
        results.append(wrk(f"mixed 70/20/10 at ~{conns * 1000 / delay:,.0f}/s", mixed_lua, d * 2, connections=conns))

        figures["rss_api"] = rss_kib(stack.procs["api"].pid)
        figures["rss_worker_load"] = rss_kib(stack.procs["worker"].pid)

        # Sustained: creates offered at half the probe's rate, persisted and indexed
        # beside, by `chat-system serve` (the API and the worker in one process, at one
        # priority), as on one box; then the api process again, on its own.
        stack.stop("api")
        stack.stop("worker")
        stack.start("serve", "serve", BIND=API)
        wait_until("chat-system serve", lambda: http_ok(API))
        held = sustained(base, figures.get("probe_ceiling") or figures["create_alone_rps"], steady_s // 2)
        results.append(held["result"])
        results += [s["result"] for s in held["steps"][1:]]
        figures["sustained"] = held
        stack.stop("serve")
        stack.start("api", "api", BIND=API)
        wait_until("the api", lambda: http_ok(API))

        # Backlog drain: stop the worker, queue a backlog, time the drain.
        stack.stop("worker")
        # What a queued message costs in Redis (the body is stored once).
        figures["redis_bytes_100"] = queued_bytes(token, 20_000, "m" * 100)
        figures["redis_bytes_64k"] = queued_bytes(token, 200, "b" * 65_535)
        log(f"Redis per queued message: {figures['redis_bytes_100']:,.0f} B (100-byte body), "
            f"{figures['redis_bytes_64k']:,.0f} B (65,535-byte body)")
        persist_rps, index_rps, cpu_drain, backlog, _ = drain_with_cpu(stack, token, backlog, "worker2")
        figures["drain_persist_rps"] = persist_rps
        figures["drain_index_rps"] = index_rps
        figures["cpu_drain"] = cpu_drain
        figures["backlog"] = backlog
        figures["rss_worker_drain"] = rss_kib(stack.procs["worker2"].pid)
        memory.stop()
        figures["anon_peak_kib"] = memory.peaks
        search_results, search_figures = search_section(stack, d)
        results += search_results
        figures.update(search_figures)
    finally:
        stack.stop_all()
        common.deps("stop", deps_env, check=False, quiet=False)
    if not (args.soak or args.search or args.drain is not None or args.serve_paced is not None or args.growth or args.idle_after_load):
        write_results(results, figures, quick)


def soak(stack, base, minutes):
    """Creates at 60% of the measured maximum for `minutes`; private RSS and queue
    sampled every 2 s.

    Memory is judged on windows, not single samples: the worker's private memory
    swings by tens of MiB within seconds as index segments are written and merged, so
    two samples can differ by 30% with nothing growing. After a minute of warm-up, the
    median of the next minute is compared with the median of the last minute; growth
    must stay under 10%, and the highest sample of either process under its RSS target.
    The queue must stay bounded and no request may fail."""
    create = lua_post(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr())
    peak = wrk("create message (peak, for the soak rate)", create, 8)
    conns = 64
    delay = max(1, round(conns * 1000 / (peak["rps"] * 0.6)))
    samples = []

    def sample():
        samples.append({
            "t": time.time(),
            # Private memory: the mapped search index grows with the data, as it should.
            "api": anon_kib(stack.procs["api"].pid) / 1024,
            "worker": anon_kib(stack.procs["worker"].pid) / 1024,
            "queue": group_lag("persist"),
        })

    sample()
    sampler = _Sampler(sample, every=2)
    run_s = int(minutes * 60)
    result = wrk(f"soak: creates at ~{conns * 1000 / delay:,.0f}/s for {minutes:g} min",
                 lua_post(f'"{base}/" .. math.random(1000) .. "/messages"', body_expr(), delay_ms=delay),
                 run_s, connections=conns)
    sampler.stop()
    sample()
    t0 = samples[0]["t"]
    for x in samples:
        x["t"] -= t0
    run_end = samples[-1]["t"]
    warm = [x for x in samples if 60 <= x["t"] < 120]
    last = [x for x in samples if x["t"] >= run_end - 60]
    after_warm = [x for x in samples if x["t"] >= 60]
    targets = {"api": 64, "worker": 128}
    growth, highest = {}, {}
    for k in targets:
        growth[k] = statistics.median(x[k] for x in last) / statistics.median(x[k] for x in warm) - 1
        highest[k] = max(x[k] for x in after_warm)
    queue_max = max(x["queue"] for x in samples)
    ok = (result["errors"] == 0 and result["non2xx"] == 0
          and all(g < 0.10 for g in growth.values())
          and all(highest[k] <= targets[k] for k in targets)
          and samples[-1]["queue"] < 10_000)
    lines = [f"# Soak — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"Creates offered at {conns * 1000 / delay:,.0f}/s (60% of the {peak['rps']:,.0f}/s the API took alone, "
             f"rounded to whole milliseconds between requests) for {minutes:g} min, taken at {result['rps']:,.0f}/s "
             f"with the worker persisting and indexing beside the API: "
             f"{result['requests']:,} requests, errors {result['errors']}, non-2xx {result['non2xx']}, "
             f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms.", "",
             "Private RSS in MiB (min / median / max of the samples taken every 2 s in each half minute), "
             "and the persist queue's length at the end of each half minute.", "",
             "| from | api | worker | queue (persist) |", "|---:|---:|---:|---:|"]

    def spread(xs, k):
        v = sorted(x[k] for x in xs)
        return f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}"

    for start in range(0, int(run_end) + 1, 30):
        xs = [x for x in samples if start <= x["t"] < start + 30]
        if xs:
            lines.append(f"| {start} s | {spread(xs, 'api')} | {spread(xs, 'worker')} | {xs[-1]['queue']} |")
    lines += ["",
              "Median private RSS, minute after warm-up (60–120 s) → last minute: "
              + ", ".join(f"{k} {statistics.median(x[k] for x in warm):.1f} → {statistics.median(x[k] for x in last):.1f} MiB "
                          f"({growth[k]:+.1%})" for k in targets) + " (limit +10%).",
              "Highest sample after warm-up: "
              + ", ".join(f"{k} {highest[k]:.1f} MiB (target ≤ {targets[k]})" for k in targets) + ".",
              f"Queue max {queue_max}, at end {samples[-1]['queue']}.", "",
              f"Verdict: {'PASS' if ok else 'FAIL'}. Reproduce: `scripts/bench --soak {minutes:g}`.", ""]
    text = "\n".join(lines)
    (RESULTS / "soak.md").write_text(text)
    print(text)
    if not ok:
        raise SystemExit(1)


def _port_open(addr):
    import socket
    host, port = addr.split(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


class _Sampler:
    """Calls `fn` every 0.5 s on a thread until stopped."""

    def __init__(self, fn, every=0.5):
        import threading
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(fn,), daemon=True)
        self._thread.start()

    def _loop(self, fn):
        while not self._stop.wait(self._every):
            fn()

    def stop(self):
        self._stop.set()
        self._thread.join()


BINARY = None  # the release build, set by main()


def create_call(token, chat, body, prefix=PREFIX, max_entries=100_000_000):
    """The product's create-message script with its KEYS and ARGV for one message, as
    `chat-system create-script` spells them (key names never written here)."""
    env = dict(os.environ, REDIS_PREFIX=prefix, QUEUE_MAX_ENTRIES=str(max_entries))
    return common.create_script(BINARY, env, token, chat, body)


def evalsha_args(call, sha):
    return ["EVALSHA", sha, str(len(call["keys"])), *call["keys"], *call["args"]]


def redis_ceiling():
    """redis-benchmark running the product's own create script, 50 clients."""
    call = create_call("rbtoken", 1, "hello benchmark body", prefix="rb")
    sha = redis("SCRIPT", "LOAD", call["script"])
    for command in call["seed"]:
        redis(*command)
    out = run(["redis-benchmark", "-p", str(REDIS_PORT), "-c", "50", "-n", "300000", "-q",
               *evalsha_args(call, sha)])
    rps = float(re.search(r"([\d.]+) requests per second", out).group(1))
    subprocess.run(f"redis-cli -p {REDIS_PORT} --scan --pattern 'rb:*' | xargs -r -n 1000 redis-cli -p {REDIS_PORT} DEL > /dev/null",
                   shell=True, check=True)
    log(f"ceiling: Redis (redis-benchmark, create script, 50 clients): {rps:,.0f}/s")
    return rps


def fill_backlog(token, count, body="backlog message w001 lorem ipsum"):
    """Queues `count` messages in chat 2 with the product's script (pipelined)."""
    call = create_call(token, 2, body)
    sha = redis("SCRIPT", "LOAD", call["script"])
    run(["redis-benchmark", "-p", str(REDIS_PORT), "-c", "50", "-n", str(count), "-P", "16", "-q",
         *evalsha_args(call, sha)])


def used_memory():
    """Redis's used_memory, once no append-only-file rewrite is running (its buffers are
    counted in used_memory and belong to no key)."""
    wait_until("Redis's append-only file rewrite", lambda: "aof_rewrite_in_progress:0" in redis("INFO", "persistence"), 300, 0.2)
    return int(re.search(r"^used_memory:(\d+)", redis("INFO", "memory"), re.M).group(1))


def queued_bytes(token, count, body):
    """Redis bytes per queued message (stream entry and pending record) with this body."""
    before = used_memory()
    fill_backlog(token, count, body)
    return (used_memory() - before) / count


def fmt(v, unit="", digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def write_results(results, f, quick):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    probe, http_c, redis_c = f.get("probe_ceiling"), f.get("http_ceiling"), f.get("redis_ceiling")
    lines = [f"# Benchmark results — {stamp}{' (quick)' if quick else ''}", "",
             "Machine: " + common.machine_summary() + "; "
             "load from wrk (2 threads) on the same machine, over loopback; "
             f"worker priority: {WORKER_PRIORITY}.", "",
             "| scenario | req/s | vs HTTP+Redis ceiling | p50 ms | p99 ms | p99.9 ms | errors | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['rps'] / probe:.0%}" if probe and r["scenario"].startswith(("create", "steady")) else ""
        lines.append(f"| {r['scenario']} | {r['rps']:,.0f} | {ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['p999_ms']:.2f} | {r['errors']} | {r['non2xx']} |")
    steady = f.get("steady", {})
    peaks = f.get("anon_peak_kib", {})

    def peak(role):
        return fmt(peaks[role] / 1024, " MiB", 1) if peaks.get(role) else "n/a"

    lines += ["", "| measure | figure | target |", "|---|---:|---|",
              f"| HTTP ceiling (GET /healthz) | {fmt(http_c, '/s')} | |",
              f"| Redis ceiling (create script, redis-benchmark 50 clients) | {fmt(redis_c, '/s')} | |",
              f"| HTTP+Redis ceiling (probe) | {fmt(probe, '/s')} | |",
              f"| create message, API alone / HTTP+Redis ceiling | {f['create_alone_rps'] / probe:.0%} | ≥ 60% |" if probe and f.get("create_alone_rps") else "",
              *read_target_rows(f),
              f"| create message with the worker persisting and indexing beside it / HTTP+Redis ceiling | {f['create_rps'] / probe:.0%} | |" if probe and f.get("create_rps") else "",
              sustained_row(f.get("sustained")),
              f"| steady: create p99 | {fmt(steady.get('p99_ms'), ' ms', 2)} | ≤ 5 ms |",
              f"| steady: persistence lag p50 / p99 | {fmt(f.get('persist_lag_seconds_p50'), ' ms', 1)} / {fmt(f.get('persist_lag_seconds_p99'), ' ms', 1)} | p99 ≤ 250 ms |",
              f"| steady: indexing lag p50 / p99 | {fmt(f.get('index_lag_seconds_p50'), ' ms', 1)} / {fmt(f.get('index_lag_seconds_p99'), ' ms', 1)} | p99 ≤ 1 s |",
              f"| steady: queue (persist group) max / at end, {f.get('queue_samples', 0)} samples | {f.get('queue_max', 'n/a')} / {f.get('queue_end', 'n/a')} | does not grow |",
              f"| backlog of {f.get('backlog', 0):,}: persisted | {fmt(f.get('drain_persist_rps'), '/s')} | ≥ 100,000/s |",
              f"| backlog: indexed | {fmt(f.get('drain_index_rps'), '/s')} | |",
              f"| Redis per queued message, 100-byte body (used_memory delta) | {fmt(f.get('redis_bytes_100'), ' B')} | ≤ 400 B |",
              f"| Redis per queued message, 65,535-byte body / the body | {fmt(f.get('redis_bytes_64k'), ' B')} / {fmt(f.get('redis_bytes_64k', 0) / 65_535, '×', 2)} | ≤ 1.2× |",
              f"| search corpus (messages in the chat) | {f.get('search_corpus', 0):,} | 100,000 |",
              f"| peak RSS, api: private / with mapped index pages | {peak('api')} / {fmt(f['rss_api'][0] / 1024, ' MiB', 1)} | ≤ 64 MiB |" if f.get("rss_api") else "",
              f"| peak RSS, worker under load: private / with mapped index pages | {peak('worker_load')} / {fmt(f['rss_worker_load'][0] / 1024, ' MiB', 1)} | ≤ 128 MiB |" if f.get("rss_worker_load") else "",
              f"| peak RSS, worker draining the backlog: private / with mapped index pages | {peak('worker_drain')} / {fmt(f['rss_worker_drain'][0] / 1024, ' MiB', 1)} | ≤ 128 MiB |" if f.get("rss_worker_drain") else "",
              *search_figure_rows(f),
              "", "Reproduce: `scripts/bench" + (" --quick" if quick else "") + "`."]
    text = "\n".join(l for l in lines if l is not None) + "\n"
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    name = "latest-quick" if quick else "latest"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.svg").write_text(chart(results))
    (out / f"{name}.json").write_text(json.dumps({"results": results, "figures": f}, indent=1, default=str))
    print(text)


def read_target_rows(f):
    """Saturated reads against the API-alone create rate of the same run."""
    alone = f.get("create_alone_rps")
    if not alone:
        return []
    rows = []
    for key, what, target in (("get_rps", "get message, any of the chat", "≥ 0.5×"),
                              ("get_recent_rps", "get message, newest 1,000", "≥ 0.5×"),
                              ("page_rps", "list page (50), anywhere in the chat", "≥ 0.25×"),
                              ("page_recent_rps", "list page (50), newest first", "≥ 0.25×")):
        if f.get(key):
            rows.append(f"| {what} / create message, API alone | {f[key] / alone:.2f}× | {target} |")
    return rows


def chart(results):
    """A bar chart of req/s with p99 latency, as plain SVG."""
    rows = [r for r in results if not r["scenario"].startswith("(")]
    width, bar_h, gap, left = 900, 22, 10, 330
    height = 40 + len(rows) * (bar_h + gap)
    top = max(r["rps"] for r in rows) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             '<text x="10" y="20" font-size="14" font-weight="bold">Throughput (req/s) and p99 latency per scenario</text>']
    for i, r in enumerate(rows):
        y = 35 + i * (bar_h + gap)
        w = (width - left - 170) * r["rps"] / top
        parts.append(f'<text x="10" y="{y + 15}">{_esc(r["scenario"][:48])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4878a8"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{r["rps"]:,.0f}/s · p99 {r["p99_ms"]:.2f} ms</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;")


if __name__ == "__main__":
    main()
