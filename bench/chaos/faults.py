"""The faults the chaos run injects while the load runs, each recorded as a Fault with
its times (seconds since the load began) and what was measured during it."""

import http.client
import json
import os
import pathlib
import random
import resource
import signal
import subprocess
import threading
import time

from common import http_get, read_pid

from .base import APIS, CLIENT_TIMEOUT, DEPS_DIR, REDIS_PORT, log, mib, now
from .load import Client, Flood, Rec, accepted_messages, search_for
from .stack import deps, metric, pid_alive, queue_status, redis, redis_memory


class Fault:
    def __init__(self, name, detail, t_begin):
        self.name, self.detail, self.t_begin = name, detail, t_begin
        self.t_end = None  # the dependency or process is back
        self.down_from = self.down_to = None  # when it was certainly down
        self.dependency = None  # "redis" or "mysql" for dependency outages


def wait_gone(pid, limit, every):
    """Waits up to `limit` seconds for a process to be gone; whether it is."""
    deadline = time.monotonic() + limit
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(every)
    return not pid_alive(pid)


def restart_dependency(fault, seconds, what):
    """The rest of a dependency outage whose process is gone: down until `seconds` after
    the fault began, then scripts/deps start."""
    fault.down_from = now()
    time.sleep(max(0.0, fault.t_begin + seconds - now()))
    fault.down_to = now()
    deps("start")
    fault.t_end = now()
    fault.detail += f"; down {fault.t_end - fault.t_begin:.1f} s in all"
    log(f"  {what} back after {fault.t_end - fault.t_begin:.1f} s")


# ---- processes and dependencies -------------------------------------------------------

def kill_worker(stack, faults, which, down):
    holder = stack.holder()
    victim = holder if which == "holder" else next(w for w in stack.workers if w is not holder)
    role = "index writer holder" if victim.holds_writer else "persist only"
    fault = Fault("kill -9 worker", f"{victim.name} ({role}), down {down:.0f} s", now())
    log(f"fault: kill -9 {victim.name} ({role}, pid {victim.pid})")
    victim.kill9()
    stack.workers.remove(victim)
    fault.down_from = now()
    time.sleep(down)
    fault.down_to = now()
    replacement = stack.start_worker()
    fault.t_end = now()
    fault.detail += (f"; replaced by {replacement.name} "
                     f"({'index writer holder' if replacement.holds_writer else 'persist only'})")
    log(f"  {replacement.name} started (holds index writer: {replacement.holds_writer}); "
        f"writer now held by {getattr(stack.holder(), 'name', 'no worker')}")
    faults.append(fault)


def restart_redis(faults):
    fault = Fault("Redis graceful restart", "SHUTDOWN (AOF fsynced), start again", now())
    fault.dependency = "redis"
    log("fault: redis-cli shutdown")
    pid = read_pid(DEPS_DIR / "redis" / "redis.pid")
    subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "shutdown"], capture_output=True,
                   timeout=30)
    if pid and not wait_gone(pid, 30, 0.02):
        raise SystemExit("chaos: Redis did not shut down within 30 s")
    fault.down_from = now()
    fault.down_to = now()
    deps("start")
    fault.t_end = now()
    fault.detail += f"; down {fault.t_end - fault.t_begin:.1f} s"
    log(f"  Redis back after {fault.t_end - fault.t_begin:.1f} s")
    faults.append(fault)


def kill_master(faults, port, seconds):
    """kill -9 one master of the cluster, down `seconds`, then started again (its AOF,
    fsynced at every write here, brings its data back)."""
    fault = Fault("Redis master killed", f"kill -9 the master on :{port}, {seconds:.0f} s, "
                  "start again", now())
    fault.dependency = "redis-master"
    fault.master = port
    pid = read_pid(DEPS_DIR / "cluster" / str(port) / "redis.pid")
    if not pid:
        raise SystemExit(f"chaos: no pid file for the master on :{port}")
    log(f"fault: kill -9 the Redis master on :{port} (pid {pid}) for {seconds:.0f} s")
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, 10, 0.02)
    restart_dependency(fault, seconds, f"master :{port}")
    faults.append(fault)


def stop_mysql(faults, seconds):
    fault = Fault("MariaDB stopped", f"SIGTERM, {seconds:.0f} s, start again", now())
    fault.dependency = "mysql"
    pid = read_pid(DEPS_DIR / "mysql" / "mysqld.pid")
    if not pid:
        raise SystemExit("chaos: no MariaDB pid file")
    log(f"fault: SIGTERM MariaDB (pid {pid}) for {seconds:.0f} s")
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 30, 0.05):
        raise SystemExit("chaos: MariaDB did not stop within 30 s")
    restart_dependency(fault, seconds, "MariaDB")
    faults.append(fault)


# ---- the connection flood -------------------------------------------------------------

def tcp_counters():
    """Host-wide TCP counters of the kernel: listen-queue overflows and SYN retransmits."""
    try:
        lines = pathlib.Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    counters = {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            counters.update(zip(names.split()[1:], map(int, values.split()[1:])))
    return {k: counters.get(k, 0) for k in ("ListenOverflows", "TCPSynRetrans")}


def raise_open_files(want):
    """Raises the soft open-files limit to the hard one; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < want:
        log(f"open files limit {soft} < {want} wanted (ulimit -Hn)")
    return soft


def normal_client(load, fault, api, done):
    """A normal client of the flooded API: /healthz and message creates in turn, each on
    a new connection whose connect time counts in the request's latency."""
    addr = APIS[api]
    rng = random.Random(11)
    i = 0
    while not done.is_set():
        i += 1
        client = Client(addr)
        t0 = now()
        client.conn = http.client.HTTPConnection(client.host, client.port,
                                                 timeout=CLIENT_TIMEOUT)
        try:
            client.conn.connect()  # timed alone: a SYN dropped costs a second
        except OSError:
            client.close()  # the request below reports the failure
        fault.connects.append(now() - t0)
        if i % 2:
            status, raw = client.request("GET", "/healthz")
            client.close()
            rec = Rec("get-healthz", api, t0, now(), status, None, None, None, None,
                      "" if status == 200 else raw[:200].decode(errors="replace"))
            load.records.append(rec)
        else:
            token, chat = rng.choice(load.chats)
            rec = load.create_message(client, api, token, chat)
            rec.t0 = t0  # the connect is part of the client's wait
            client.close()
        fault.probes.append(rec)
        done.wait(0.05)


def connections_gauge(fault, addr, done):
    """The API's http_connections_open gauge every 0.5 s."""
    while not done.wait(0.5):
        value = metric(addr, "http_connections_open")
        if value is not None:
            fault.gauge.append((now(), value))


def flood_connections(stack, load, faults, n, seconds):
    """(6) A slow-header and idle-connection flood on api1, while a normal client checks
    /healthz and a create on it, each on a new connection."""
    api = 0
    addr = APIS[api]
    flood = Flood(addr, n)
    fault = Fault("connection flood", f"{n} connections to api{api + 1} (half idle, half "
                  f"sending a request head 1 byte / {Flood.SLOW_BYTE_EVERY:.0f} s), "
                  f"{seconds:.0f} s", now())
    fault.flood, fault.probes, fault.gauge = flood, [], []
    fault.connects = []  # the normal client's connect times
    fault.tcp_before = tcp_counters()
    log(f"fault: {n} idle and slow connections to api{api + 1} for {seconds:.0f} s")
    done = threading.Event()
    threads = [threading.Thread(target=normal_client, args=(load, fault, api, done), daemon=True),
               threading.Thread(target=connections_gauge, args=(fault, addr, done), daemon=True)]
    for t in threads:
        t.start()
    try:
        flood.run(seconds)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT + 2)
    fault.t_end = now()
    after = tcp_counters()
    fault.tcp_delta = {k: after[k] - fault.tcp_before.get(k, 0) for k in after}
    closed = len(flood.closed_by_server)
    log(f"  flood over: {flood.peak} held at peak, {flood.opened} opened, {closed} closed "
        f"by the server")
    faults.append(fault)


# ---- Redis at maxmemory -----------------------------------------------------------------

def poll_readyz(fault, seconds):
    """/readyz of both APIs in turn every 0.2 s until `seconds` after the fault began."""
    i = 0
    while now() < fault.t_begin + seconds:
        i += 1
        try:
            status, raw = http_get(APIS[i % 2], "/readyz", timeout=CLIENT_TIMEOUT)
            queue = json.loads(raw).get("checks", {}).get("queue")
        except (OSError, ValueError, AttributeError) as e:
            status, queue = f"error {type(e).__name__}", None
        fault.readyz.append((now(), i % 2, status, queue))
        time.sleep(0.2)


def first_create_after(load, t, limit):
    """Seconds from `t` to the end of the first create started after it that got a 201,
    waiting up to `limit` seconds for one (None if none came)."""
    mark = len(load.records)
    deadline = now() + limit
    while now() < deadline:
        ok = [r.t1 for r in load.records[mark:] if r.kind in ("chat", "message")
              and r.status == 201 and r.t0 >= t]
        if ok:
            return min(ok) - t
        time.sleep(0.1)
    return None


def fill_redis(load, faults, seconds):
    """(7) Redis's maxmemory set just above its used memory for `seconds`, then restored,
    while /readyz is polled on both APIs."""
    used, _ = redis_memory()
    original = redis("CONFIG", "GET", "maxmemory").split()[1]
    # 5% above what Redis uses now: its 90% mark (QUEUE_MAX_MEMORY's default) is then
    # below the current use, and Redis's own bound (OOM) a few hundred creates away.
    bound = used + used // 20
    fault = Fault("Redis at maxmemory", f"maxmemory {mib(int(original))} → {mib(bound)} "
                  f"(used_memory {mib(used)}) for {seconds:.0f} s", now())
    fault.dependency = "redis-memory"
    fault.readyz = []  # (t, api, status, checks.queue)
    log(f"fault: Redis maxmemory {bound} (used_memory {used}) for {seconds:.0f} s")
    redis("CONFIG", "SET", "maxmemory", bound)
    try:
        fault.down_from = now()
        poll_readyz(fault, seconds)
    finally:
        redis("CONFIG", "SET", "maxmemory", original)
    fault.down_to = fault.t_end = now()
    # Recovery: the first create started after the restore that got a 201.
    fault.recovered_in = first_create_after(load, fault.t_end, 10)
    fault.detail += "; creates back after " + (
        "NO" if fault.recovered_in is None else f"{fault.recovered_in:.2f} s")
    log(f"  maxmemory restored to {original}; {fault.detail.rsplit('; ', 1)[1]}")
    faults.append(fault)


# ---- the search outage ------------------------------------------------------------------

def sample_redis(fault, seconds):
    """Redis's used memory and the stream's length every second while the indexer is
    frozen, and when the index gap was first marked."""
    next_at = now()
    while now() < fault.t_begin + seconds:
        time.sleep(max(0.0, next_at - now()))
        next_at += 1.0
        try:
            used, xlen = redis_memory()
            fault.samples.append((now(), used, xlen))
            if fault.gap_at is None and queue_status()["index_gap"]:
                fault.gap_at = now() - fault.down_from
        except (RuntimeError, AttributeError, subprocess.TimeoutExpired) as e:
            log(f"  sampling Redis: {e}")


def outage_sample(load, fault):
    """A sample of the messages accepted while the indexer was frozen, its first and last
    ones included (around the gap's start and the resumption)."""
    during = accepted_messages(load, fault.down_from, fault.down_to)
    fault.created = len(during)
    rng = random.Random(13)
    middle = during[20:-20]
    return during[:20] + rng.sample(middle, min(len(middle), 60)) + during[-20:]


def caught_up(holder, before, limit=30):
    """How many messages the resumed indexer read back from MySQL (waiting up to `limit`
    seconds for its index_caught_up_total to grow)."""
    deadline = time.monotonic() + limit
    grown = 0.0
    while time.monotonic() < deadline:
        grown = (metric(holder.port, "index_caught_up_total") or 0.0) - before
        if grown > 0:
            break
        time.sleep(0.5)
    return grown


def freeze_indexer(stack, load, faults, seconds, search_limit):
    """(8) A search outage: the worker holding the index writer is frozen (SIGSTOP) for
    `seconds`, Redis memory and the stream's length sampled every second, then it is
    resumed (SIGCONT) and messages created during the outage are searched for."""
    holder = stack.holder()
    other = next(w for w in stack.workers if w is not holder)
    caught_before = metric(holder.port, "index_caught_up_total") or 0.0
    trimmed_before = metric(other.port, "index_trimmed_past_total") or 0.0
    fault = Fault("search outage", f"SIGSTOP {holder.name} (index writer holder, pid "
                  f"{holder.pid}) for {seconds:.0f} s", now())
    fault.baseline = redis_memory()
    fault.samples = []  # (t, used_memory, stream length)
    fault.gap_at = None  # when {prefix}:index:gap was first seen
    log(f"fault: SIGSTOP {holder.name} (index writer holder, pid {holder.pid}) "
        f"for {seconds:.0f} s")
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        fault.down_from = now()
        sample_redis(fault, seconds)
        fault.trimmed_past = (metric(other.port, "index_trimmed_past_total") or 0.0) - trimmed_before
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    fault.down_to = fault.t_end = now()
    log(f"  SIGCONT {holder.name}; searching for messages created during the outage")
    fault.sample = outage_sample(load, fault)
    fault.not_found, fault.wrong, fault.searchable_in = search_for(fault.sample, search_limit)
    # The resumed indexer caught up from MySQL (the gap was read back from there).
    fault.caught_up = caught_up(holder, caught_before)
    peak_used = max((u for _, u, _ in fault.samples), default=0)
    peak_len = max((n for _, _, n in fault.samples), default=0)
    fault.detail += (f"; Redis peak {mib(peak_used)}, stream peak {peak_len} entries, "
                     f"{fault.created} messages created, searchable "
                     + ("NO" if fault.searchable_in is None else
                        f"{fault.searchable_in:.1f} s") + " after SIGCONT")
    log(f"  {fault.detail.split('; ', 1)[1]}")
    faults.append(fault)
