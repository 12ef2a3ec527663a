#!/usr/bin/env python3
"""The chaos run behind `scripts/chaos`: a private stack (MariaDB, Redis, two `api` and
two `worker` processes sharing one Tantivy index), a steady create load spread over both
API processes, and faults injected in turn while the load runs:

  1. kill -9 the worker that holds the search index writer, left down ~5 s, then replaced
     (meanwhile the other worker takes the writer over);
  2. kill -9 the other worker, replaced at once;
  3. kill -9 the index-holding worker again, replaced at once;
  4. a graceful Redis restart (SHUTDOWN fsyncs the AOF, so nothing may be lost);
  5. MariaDB stopped (SIGTERM) for 10 s, then started again;
  6. a connection flood on api1: 5,000 connections (short: 1,000), half idle, half
     sending a request head a byte every 2 s, each one the server closes replaced, for
     15 s (short: 8 s); the APIs run with HEADER_READ_TIMEOUT=5s;
  7. Redis's maxmemory set 5% above its used memory for 10 s (short: 5 s), then restored;
  8. a search outage: the worker holding the index writer frozen (SIGSTOP) for 10 minutes
     (short: 20 s), then resumed (SIGCONT); the workers run with INDEX_LAG_MAX=5s, so the
     stream is trimmed past the frozen indexer, which then catches up from MySQL.

Then, after a bounded wait for the queue to drain, it checks that every 201 is persisted
exactly once with its number and text, that numbers are gap-free and unique per parent,
that counts converge, that search finds a sample of messages again, and that every failed
request was a fast 503 during a dependency outage or the maxmemory window (never a 500
or a hang) while creates, which need Redis only, kept working with MariaDB down. Per
fault: (6) a normal client's /healthz and creates on api1, each on a new connection,
stay under 1 s (p99 and max) with no failure, the flood was held and the server closed
its connections after HEADER_READ_TIMEOUT; (7) creates were refused with 503
/problems/overloaded and Retry-After, reads stayed 200, /readyz said `queue: full`, and
creates came back after the restore; (8) creates went on, the stream stayed bounded
(Redis's used_memory and the stream's length sampled every second), the stream was
trimmed past the indexer, and after SIGCONT the indexer caught up from MySQL and a
sample of the outage's messages (its first and last ones included) is searchable
within a bounded wait. It exits 1 on any violation.

Loopback only, standard library only; every phase is bounded in time: the default run
takes about 12.5 minutes (the search outage alone is 10), `--short` about 1.5 minutes.
Logs go to .data/chaos/*.log.
"""

import argparse
import http.client
import json
import os
import pathlib
import random
import re
import resource
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / ".data" / "chaos"
DEPS_DIR = ROOT / ".data" / "chaos-deps"
# Ports (environment overrides: CHAOS_MYSQL_PORT, CHAOS_REDIS_PORT, CHAOS_API_PORT for the
# first API, the second one above it, and CHAOS_WORKER_METRICS_PORT for the first worker).
MYSQL_PORT = int(os.environ.get("CHAOS_MYSQL_PORT", 23306))
REDIS_PORT = int(os.environ.get("CHAOS_REDIS_PORT", 23379))
_API_PORT = int(os.environ.get("CHAOS_API_PORT", 23931))
APIS = [f"127.0.0.1:{_API_PORT}", f"127.0.0.1:{_API_PORT + 1}"]
FIRST_WORKER_METRICS_PORT = int(os.environ.get("CHAOS_WORKER_METRICS_PORT", 23941))
PREFIX = "chaos"
PIDFILE = DATA / "pids"
# --cluster: a 3-master Redis Cluster on CHAOS_REDIS_CLUSTER_PORT and the next two, in
# place of the single Redis (which still runs, unused).
CLUSTER_PORT = int(os.environ.get("CHAOS_REDIS_CLUSTER_PORT", 23400))
MASTERS = [CLUSTER_PORT, CLUSTER_PORT + 1, CLUSTER_PORT + 2]
CLUSTER = False  # set by --cluster

CLIENT_TIMEOUT = 5.0  # a request with no answer by then is a hang
FAST = 3.0  # a 503 slower than this is not "fast"
GRACE = 3.0  # after a dependency is back, clients may still see 503s this long
# Shorter than the defaults, so that each fault shows its recovery within the run.
HEADER_READ_TIMEOUT = 5.0  # the API closes a connection without a whole request head then
INDEX_LAG_MAX = 5.0  # past this lag the stream is trimmed past the (frozen) indexer
CLAIM_IDLE = 2.0  # a frozen or dead consumer's entries are taken over after this
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROBLEM_TYPE = re.compile(r'"type"\s*:\s*"([^"]*)"')

T0 = time.monotonic()  # reset when the load starts; every recorded time is relative to it


def now():
    return time.monotonic() - T0


def log(msg):
    print(f"chaos [{now():7.2f}s]: {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    pass


def on_term(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---- dependencies ---------------------------------------------------------------------

DEPS_ENV = dict(
    os.environ,
    DEPS_DIR=str(DEPS_DIR),
    DEPS_MYSQL_PORT=str(MYSQL_PORT),
    DEPS_REDIS_PORT=str(REDIS_PORT),
)


def deps(action):
    # A session of its own: a Ctrl-C on the terminal must not kill mysqld behind our back.
    env = DEPS_ENV
    if CLUSTER:
        # Every write fsynced: a master killed with -9 then loses nothing accepted, which
        # is what the checks below hold it to (with `everysec`, up to a second can go).
        env = dict(DEPS_ENV, DEPS_REDIS_CLUSTER_PORT=str(CLUSTER_PORT),
                   DEPS_REDIS_APPENDFSYNC="always")
    subprocess.run(
        [str(ROOT / "scripts" / "deps"), action],
        env=env, check=True, start_new_session=True, timeout=90,
        stdout=subprocess.DEVNULL,
    )


def sql(query, timeout=60):
    """Rows of a query, as lists of strings (NULL is the string NULL)."""
    out = subprocess.run(
        ["mariadb", "--no-defaults", "--protocol=tcp", "-h127.0.0.1", f"-P{MYSQL_PORT}",
         "-uroot", "-N", "-B", "--raw", "-e", query],
        capture_output=True, text=True, timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"mariadb: {out.stderr.strip()}")
    return [line.split("\t") for line in out.stdout.splitlines()]


def redis(*args, timeout=30, port=None):
    out = subprocess.run(
        ["redis-cli", "-p", str(port or REDIS_PORT), "--raw", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli: {out.stderr.strip()}")
    return out.stdout


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def read_pid(path):
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ---- our processes --------------------------------------------------------------------

class Proc:
    def __init__(self, name, bin_path, command, env, port=None):
        self.name, self.port = name, port
        self.log_path = DATA / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [bin_path, command], env=env, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid
        self.killed_by_us = False
        with open(PIDFILE, "a") as f:
            f.write(f"{self.pid}\n")

    def alive(self):
        return self.popen.poll() is None

    def kill9(self):
        self.killed_by_us = True
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s."""
        if self.alive():
            self.killed_by_us = True
            self.popen.send_signal(signal.SIGTERM)
            self.popen.send_signal(signal.SIGCONT)  # in case it was left frozen
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within 10 s; killing it")
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.log_file.close()

    @property
    def holds_writer(self):
        """Whether this worker holds the index writer now, by its `search_index_writer_held`
        gauge (a frozen or dead worker answers nothing: it does not count)."""
        return metric(self.port, "search_index_writer_held") == 1.0

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def http_get(addr, path, timeout=2.0):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_healthy(proc, addr, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"chaos: {proc.name} exited at start; see {proc.log_path}:\n"
                             + proc.log_text()[-2000:])
        try:
            if http_get(addr, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"chaos: {proc.name} did not answer /healthz within {limit:.0f} s")


class Stack:
    def __init__(self, bin_path):
        self.bin = bin_path
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("ELASTICSEARCH_URL", "REDIS_CLUSTER_NODES", "WORKER_NAME", "ADMIN_API_KEY", "BIND",
                                 "WORKER_METRICS_BIND", "RUST_LOG")}
        self.env.update(
            DATABASE_URL=f"mysql://root@127.0.0.1:{MYSQL_PORT}/chat_system",
            REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}",
            REDIS_PREFIX=PREFIX,
            SEARCH_INDEX_DIR=str(DATA / "index"),
            LOG_LEVEL="warn,chat_system::startup=info",  # writer takeovers, for the reader
            DEPENDENCY_TIMEOUT="1s",
            WORKER_CLAIM_IDLE=f"{CLAIM_IDLE:.0f}s",
            HEADER_READ_TIMEOUT=f"{HEADER_READ_TIMEOUT:.0f}s",
            INDEX_LAG_MAX=f"{INDEX_LAG_MAX:.0f}s",
            COUNTS_SYNC_INTERVAL="1s",
            NO_COLOR="1",  # plain log files (tracing-subscriber honours it)
        )
        self.procs = []
        self.workers = []  # live worker processes, in start order
        self.worker_seq = 0

    def migrate(self):
        out = subprocess.run([self.bin, "migrate"], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise SystemExit(f"chaos: migrate failed: {out.stdout}{out.stderr}")

    def start_api(self, i):
        env = dict(self.env, BIND=APIS[i])
        proc = Proc(f"api{i + 1}", self.bin, "api", env, port=APIS[i])
        self.procs.append(proc)
        wait_healthy(proc, APIS[i])
        return proc

    def start_worker(self):
        self.worker_seq += 1
        addr = f"127.0.0.1:{FIRST_WORKER_METRICS_PORT + self.worker_seq - 1}"
        env = dict(self.env, WORKER_METRICS_BIND=addr)
        proc = Proc(f"worker{self.worker_seq}", self.bin, "worker", env, port=addr)
        self.procs.append(proc)
        # The index is opened (and its writer lock tried) before /healthz is served.
        wait_healthy(proc, addr)
        self.workers.append(proc)
        return proc

    def holder(self):
        holders = [w for w in self.workers if w.holds_writer]
        return holders[0] if holders else None

    def stop_all(self):
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {proc.name}: {e}")


def cleanup_leftovers():
    """Processes of an earlier run that died without cleaning up (checked by command line)."""
    if not PIDFILE.exists():
        return
    for line in PIDFILE.read_text().split():
        try:
            pid = int(line)
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            continue
        if b"chat-system" in cmdline:
            log(f"killing leftover chat-system process {pid}")
            os.kill(pid, signal.SIGKILL)
    PIDFILE.unlink()


# ---- the load ---------------------------------------------------------------------------

class Client:
    """One keep-alive connection; every failure is reported, never retried."""

    def __init__(self, addr):
        self.host, port = addr.split(":")
        self.port = int(port)
        self.conn = None
        self.retry_after = None  # the Retry-After header of the last answer, if any

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method, path, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=CLIENT_TIMEOUT)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
            self.retry_after = resp.getheader("retry-after")
            if (resp.getheader("connection") or "").lower() == "close":
                self.close()
            return resp.status, raw
        except TimeoutError:
            self.close()
            self.retry_after = None
            return "timeout", b""
        except (OSError, http.client.HTTPException) as e:
            self.close()
            self.retry_after = None
            return f"conn-error {type(e).__name__}", b""


class Rec:
    """One request: what was sent, what came back and when (seconds since the load began)."""
    __slots__ = ("kind", "api", "t0", "t1", "status", "token", "chat", "number", "text", "detail",
                 "retry_after")

    def __init__(self, kind, api, t0, t1, status, token, chat, number, text, detail="",
                 retry_after=None):
        self.kind, self.api, self.t0, self.t1, self.status = kind, api, t0, t1, status
        self.token, self.chat, self.number, self.text, self.detail = token, chat, number, text, detail
        self.retry_after = retry_after

    @property
    def problem_type(self):
        """The `type` of a problem+json answer (its first 200 bytes are kept in detail)."""
        m = PROBLEM_TYPE.search(self.detail or "")
        return m.group(1) if m else None

    @property
    def latency(self):
        return self.t1 - self.t0


class Load:
    def __init__(self, run, apps, rate, threads, chat_share):
        self.run, self.apps = run, apps
        self.rate, self.threads, self.chat_share = rate, threads, chat_share
        self.records = []
        self.chats = []  # (token, number) of every chat with a 201
        self.last_message = None  # (api, token, chat, number) of a recent 201
        self.lock = threading.Lock()
        self.seq = 0
        self.stop = threading.Event()
        self.pool = []

    def next_seq(self):
        with self.lock:
            self.seq += 1
            return self.seq

    def create_chat(self, client, api, token):
        title = f"chaos-{self.run}-c{self.next_seq():07d}"
        t0 = now()
        status, raw = client.request("POST", f"/applications/{token}/chats", {"title": title})
        t1 = now()
        number, detail = None, ""
        if status == 201:
            try:
                doc = json.loads(raw)
                number = int(doc["number"])
                if doc.get("title") != title:
                    detail = f"answered title {doc.get('title')!r}"
            except (ValueError, KeyError, TypeError) as e:
                detail = f"bad 201 body: {e}: {raw[:200]!r}"
            if number is not None:
                self.chats.append((token, number))
        else:
            detail = raw[:200].decode(errors="replace")
        self.records.append(Rec("chat", api, t0, t1, status, token, None, number, title, detail,
                                client.retry_after))
        return number

    def create_message(self, client, api, token, chat):
        body = f"chaos-{self.run}-{self.next_seq():07d}"
        t0 = now()
        status, raw = client.request(
            "POST", f"/applications/{token}/chats/{chat}/messages", {"body": body})
        t1 = now()
        number, detail = None, ""
        if status == 201:
            try:
                doc = json.loads(raw)
                number = int(doc["number"])
                if doc.get("body") != body or doc.get("chat_number") != chat:
                    detail = f"answered {doc!r}"
            except (ValueError, KeyError, TypeError) as e:
                detail = f"bad 201 body: {e}: {raw[:200]!r}"
            if number is not None:
                self.last_message = (api, token, chat, number)
        else:
            detail = raw[:200].decode(errors="replace")
        rec = Rec("message", api, t0, t1, status, token, chat, number, body, detail,
                  client.retry_after)
        self.records.append(rec)
        return rec

    def worker(self, index):
        api = index % len(APIS)
        client = Client(APIS[api])
        rng = random.Random(index)
        interval = self.threads / self.rate
        next_at = time.monotonic() + rng.random() * interval
        try:
            while not self.stop.is_set():
                wait = next_at - time.monotonic()
                if wait > 0:
                    self.stop.wait(wait)
                    continue
                # After a stall, catch up by at most one second's worth of requests.
                next_at = max(next_at + interval, time.monotonic() - 1.0)
                if not self.chats or rng.random() < self.chat_share:
                    self.create_chat(client, api, rng.choice(self.apps))
                else:
                    token, chat = rng.choice(self.chats)
                    self.create_message(client, api, token, chat)
        finally:
            client.close()

    def probe(self):
        """Reads at a low rate: an application (MySQL) and a recent message (a pending
        record in Redis, or MySQL once persisted)."""
        clients = [Client(a) for a in APIS]
        i = 0
        try:
            while not self.stop.wait(0.1):
                i += 1
                api = i % len(APIS)
                if i % 2 == 0 or self.last_message is None:
                    token = self.apps[i % len(self.apps)]
                    path, kind, chat, number = f"/applications/{token}", "get-app", None, None
                else:
                    _, token, chat, number = self.last_message
                    path = f"/applications/{token}/chats/{chat}/messages/{number}"
                    kind = "get-message"
                t0 = now()
                status, raw = clients[api].request("GET", path)
                t1 = now()
                detail = "" if status == 200 else raw[:200].decode(errors="replace")
                self.records.append(Rec(kind, api, t0, t1, status, token, chat, number, None, detail))
        finally:
            for c in clients:
                c.close()

    def start(self):
        for i in range(self.threads):
            t = threading.Thread(target=self.worker, args=(i,), daemon=True)
            t.start()
            self.pool.append(t)
        t = threading.Thread(target=self.probe, daemon=True)
        t.start()
        self.pool.append(t)

    def finish(self):
        self.stop.set()
        for t in self.pool:
            t.join(timeout=CLIENT_TIMEOUT + 5)


# ---- faults -----------------------------------------------------------------------------

class Fault:
    def __init__(self, name, detail, t_begin):
        self.name, self.detail, self.t_begin = name, detail, t_begin
        self.t_end = None  # the dependency or process is back
        self.down_from = self.down_to = None  # when it was certainly down
        self.dependency = None  # "redis" or "mysql" for dependency outages


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
    deadline = time.monotonic() + 30
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid and pid_alive(pid):
        raise SystemExit("chaos: Redis did not shut down within 30 s")
    fault.down_from = now()
    fault.down_to = now()
    deps("start")
    fault.t_end = now()
    fault.detail += f"; down {fault.t_end - fault.t_begin:.1f} s"
    log(f"  Redis back after {fault.t_end - fault.t_begin:.1f} s")
    faults.append(fault)


def master_of(token):
    """The port of the cluster master serving the application's shard."""
    out = subprocess.run([QUEUE_STATUS[0], "create-script", "--token", token],
                         env=QUEUE_STATUS[1], capture_output=True, text=True, timeout=60)
    slot = json.loads(out.stdout)["slot"]
    for line in redis("CLUSTER", "NODES", port=MASTERS[0]).splitlines():
        fields = line.split()
        if len(fields) < 9 or "master" not in fields[2]:
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for r in fields[8:]:
            lo, _, hi = r.partition("-")
            if r[0] != "[" and int(lo) <= slot <= int(hi or lo):
                return port
    raise SystemExit(f"chaos: no master serves slot {slot}")


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
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    fault.down_from = now()
    time.sleep(max(0.0, fault.t_begin + seconds - now()))
    fault.down_to = now()
    deps("start")
    fault.t_end = now()
    fault.detail += f"; down {fault.t_end - fault.t_begin:.1f} s in all"
    log(f"  master :{port} back after {fault.t_end - fault.t_begin:.1f} s")
    faults.append(fault)


def check_master(v, load, fault, masters):
    """(9) while a master was down, the applications of the other masters got 201s only,
    and those of the dead one 503s with Retry-After (never another answer)."""
    a, b = fault.down_from + 0.5, fault.down_to
    during = [r for r in load.records if r.kind in ("chat", "message") and a <= r.t0
              and r.t1 <= b]
    others = [r for r in during if masters[r.token] != fault.master]
    mine = [r for r in during if masters[r.token] == fault.master]
    bad_others = [r for r in others if r.status != 201]
    bad_mine = [r for r in mine if r.status != 503 or not r.retry_after]
    if not others:
        v.fail(9, "no create for the other masters' applications while the master was down")
    if bad_others:
        v.fail(9, f"{len(bad_others)} of {len(others)} creates of the other masters' "
                  "applications failed while one master was down", grouped(bad_others, [fault]))
    if bad_mine:
        v.fail(9, f"{len(bad_mine)} of {len(mine)} creates of the dead master's "
                  "applications were not a 503 with Retry-After", grouped(bad_mine, [fault]))
    fault.split = (sum(1 for r in others if r.status == 201), len(others),
                   sum(1 for r in mine if r.status == 503), len(mine))


def stop_mysql(faults, seconds):
    fault = Fault("MariaDB stopped", f"SIGTERM, {seconds:.0f} s, start again", now())
    fault.dependency = "mysql"
    pid = read_pid(DEPS_DIR / "mysql" / "mysqld.pid")
    if not pid:
        raise SystemExit("chaos: no MariaDB pid file")
    log(f"fault: SIGTERM MariaDB (pid {pid}) for {seconds:.0f} s")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        raise SystemExit("chaos: MariaDB did not stop within 30 s")
    fault.down_from = now()
    time.sleep(max(0.0, fault.t_begin + seconds - now()))
    fault.down_to = now()
    deps("start")
    fault.t_end = now()
    fault.detail += f"; down {fault.t_end - fault.t_begin:.1f} s in all"
    log(f"  MariaDB back after {fault.t_end - fault.t_begin:.1f} s")
    faults.append(fault)


# ---- faults on connections, Redis memory and search --------------------------------------

def metric(addr, name, timeout=2.0):
    """The sum of every series of a metric on a /metrics page (None if unreachable)."""
    try:
        status, raw = http_get(addr, "/metrics", timeout=timeout)
    except OSError:
        return None
    if status != 200:
        return None
    total, seen = 0.0, False
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


# The stack's `chat-system queue-status` command line, set when the stack is made: the
# queue's state comes from the product's own report, never from its Redis key names.
QUEUE_STATUS = None


def queue_status(tokens=()):
    """`chat-system queue-status` as a dict (per shard and totals; counters of tokens)."""
    binary, env = QUEUE_STATUS
    args = [binary, "queue-status"]
    for token in tokens:
        args += ["--counters-of", token]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"queue-status: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def redis_memory():
    """Redis's used_memory (summed over the masters of a cluster) and the write queue's
    length."""
    ports = MASTERS if CLUSTER else [REDIS_PORT]
    used = 0
    for port in ports:
        info = redis("INFO", "memory", port=port)
        used += int(re.search(r"^used_memory:(\d+)", info, re.M).group(1))
    return used, queue_status()["length"]


def mib(n):
    return f"{n / 1048576:.1f} MiB"


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


class Flood:
    """`n` connections to one API process, half sending nothing, half a request head one
    byte every `SLOW_BYTE_EVERY` s, never finished. Each connection the server closes is
    replaced while the flood lasts, so that about `n` stay open throughout.

    Connections are opened at most `OPEN_RATE` a second: a faster burst overflows the
    API's listen queue (1024) whenever its accept loop falls behind for a moment, and a
    dropped SYN costs any client, the normal one included, a one-second retransmission.
    That is the kernel's SYN handling, not what this fault is about (holding connections)."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: chaos\r\nUser-Agent: a-slow-client\r\nX-Pad: " + b"x" * 200
    SLOW_BYTE_EVERY = 2.0
    OPEN_RATE = 2000

    def __init__(self, addr, n):
        host, port = addr.split(":")
        self.target = (host, int(port))
        self.n = n
        self.sel = selectors.DefaultSelector()
        self.open = {}  # socket -> [opened at, slow?, bytes sent, next byte at]
        self.opened = 0
        self.open_errors = {}
        self.slow_connects = 0  # connects that took 0.5 s or more (a SYN retransmitted)
        self.to_open = []  # slow? of each connection to open (again)
        self.closed_by_server = []  # (closed at, age, slow?)
        self.answered = []  # first bytes of any answer (the server should send none)
        self.peak, self.peak_at = 0, None
        self.full_at = None  # when n were first open
        self.left_open = []  # ages of those still open at the end, closed by us
        self.stop = threading.Event()

    def open_one(self, slow):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        t0 = time.monotonic()
        try:
            s.connect(self.target)
            if time.monotonic() - t0 >= 0.5:
                self.slow_connects += 1
        except OSError as e:
            s.close()
            name = type(e).__name__
            self.open_errors[name] = self.open_errors.get(name, 0) + 1
            self.to_open.append(slow)  # tried again, within the rate
            return
        s.setblocking(False)
        t = now()
        self.open[s] = [t, slow, 0, t + self.SLOW_BYTE_EVERY]
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1
        if len(self.open) > self.peak:
            self.peak, self.peak_at = len(self.open), t
        if len(self.open) >= self.n and self.full_at is None:
            self.full_at = t

    def server_closed(self, s, answer=b""):
        opened_at, slow, _, _ = self.open.pop(s)
        self.sel.unregister(s)
        s.close()
        t = now()
        self.closed_by_server.append((t, t - opened_at, slow))
        if answer:
            self.answered.append(answer[:60])
        if not self.stop.is_set():
            self.to_open.append(slow)

    def run(self, seconds):
        start = now()
        end = start + seconds
        self.to_open = [i % 2 == 1 for i in range(self.n)]
        tokens, last = 0.0, start
        next_pass = start
        while now() < end:
            t = now()
            tokens, last = min(self.OPEN_RATE / 20, tokens + (t - last) * self.OPEN_RATE), t
            while self.to_open and tokens >= 1:
                tokens -= 1
                self.open_one(self.to_open.pop())
            for key, _ in self.sel.select(timeout=0.01 if self.to_open else 0.1):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                self.server_closed(s, data)
            t = now()
            if t < next_pass:
                continue
            next_pass = t + 0.25
            for s, state in list(self.open.items()):
                opened_at, slow, sent, next_at = state
                if slow and next_at <= t and sent < len(self.HEAD):
                    try:
                        s.send(self.HEAD[sent:sent + 1])
                        state[2], state[3] = sent + 1, t + self.SLOW_BYTE_EVERY
                    except BlockingIOError:
                        pass
                    except OSError:
                        self.server_closed(s)
        self.stop.set()
        t = now()
        for s, (opened_at, _, _, _) in list(self.open.items()):
            self.left_open.append(t - opened_at)
            self.sel.unregister(s)
            s.close()
        self.open.clear()
        self.sel.close()


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

    def normal_client():
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

    def gauge():
        while not done.wait(0.5):
            value = metric(addr, "http_connections_open")
            if value is not None:
                fault.gauge.append((now(), value))

    threads = [threading.Thread(target=f, daemon=True) for f in (normal_client, gauge)]
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
    finally:
        redis("CONFIG", "SET", "maxmemory", original)
    fault.down_to = fault.t_end = now()
    # Recovery: the first create started after the restore that got a 201.
    fault.recovered_in = None
    mark = len(load.records)
    deadline = now() + 10
    while fault.recovered_in is None and now() < deadline:
        ok = [r.t1 for r in load.records[mark:] if r.kind in ("chat", "message")
              and r.status == 201 and r.t0 >= fault.t_end]
        if ok:
            fault.recovered_in = min(ok) - fault.t_end
        else:
            time.sleep(0.1)
    fault.detail += "; creates back after " + (
        "NO" if fault.recovered_in is None else f"{fault.recovered_in:.2f} s")
    log(f"  maxmemory restored to {original}; {fault.detail.rsplit('; ', 1)[1]}")
    faults.append(fault)


def search_for(records, limit):
    """Searches for each record's text until every one is found or `limit` passes.
    Returns (not found, wrong answers, seconds until all were found or None)."""
    pending = list(records)
    start = time.monotonic()
    deadline = start + limit
    clients = [Client(a) for a in APIS]
    wrong = []
    i = 0
    while pending and time.monotonic() < deadline:
        still = []
        for r in pending:
            i += 1
            q = urllib.parse.quote(r.text.split("-", 1)[1])  # "<run>-<seq>", unique
            status, raw = clients[i % 2].request(
                "GET", f"/applications/{r.token}/chats/{r.chat}/messages/search?q={q}")
            found = False
            if status == 200:
                try:
                    for m in json.loads(raw):
                        if m.get("body") == r.text:
                            found = True
                            if m.get("number") != r.number:
                                wrong.append(f"{r.text!r} found as number {m.get('number')}, "
                                             f"accepted as {r.number}")
                except (ValueError, AttributeError):
                    wrong.append(f"{r.text!r}: bad search answer {raw[:100]!r}")
            if not found:
                still.append(r)
        pending = still
        if pending:
            time.sleep(0.5)
    for c in clients:
        c.close()
    return pending, wrong, (time.monotonic() - start) if not pending else None


def accepted_messages(load, a, b):
    return [r for r in list(load.records) if r.kind == "message" and r.status == 201
            and r.number is not None and a <= r.t0 <= b]


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
        fault.trimmed_past = (metric(other.port, "index_trimmed_past_total") or 0.0) - trimmed_before
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    fault.down_to = fault.t_end = now()
    log(f"  SIGCONT {holder.name}; searching for messages created during the outage")
    # A sample of the messages accepted while the indexer was frozen, its first and last
    # ones included (around the gap's start and the resumption).
    during = accepted_messages(load, fault.down_from, fault.down_to)
    fault.created = len(during)
    rng = random.Random(13)
    middle = during[20:-20]
    fault.sample = during[:20] + rng.sample(middle, min(len(middle), 60)) + during[-20:]
    fault.not_found, fault.wrong, fault.searchable_in = search_for(fault.sample, search_limit)
    # The resumed indexer caught up from MySQL (the gap was read back from there).
    deadline = time.monotonic() + 30
    fault.caught_up = 0.0
    while time.monotonic() < deadline:
        fault.caught_up = (metric(holder.port, "index_caught_up_total") or 0.0) - caught_before
        if fault.caught_up > 0:
            break
        time.sleep(0.5)
    peak_used = max((u for _, u, _ in fault.samples), default=0)
    peak_len = max((n for _, _, n in fault.samples), default=0)
    fault.detail += (f"; Redis peak {mib(peak_used)}, stream peak {peak_len} entries, "
                     f"{fault.created} messages created, searchable "
                     + ("NO" if fault.searchable_in is None else
                        f"{fault.searchable_in:.1f} s") + " after SIGCONT")
    log(f"  {fault.detail.split('; ', 1)[1]}")
    faults.append(fault)


# ---- checks -----------------------------------------------------------------------------

def in_list(tokens):
    return ",".join(f"'{t}'" for t in tokens)


def persisted_totals(tokens):
    row = sql(f"""SELECT
        (SELECT COUNT(*) FROM chat_system.chats c JOIN chat_system.applications a
           ON a.id = c.application_id WHERE a.token IN ({in_list(tokens)})),
        (SELECT COUNT(*) FROM chat_system.messages m JOIN chat_system.applications a
           ON a.id = m.application_id WHERE a.token IN ({in_list(tokens)}))""")[0]
    return int(row[0]), int(row[1])


def wait_drained(tokens, want_chats, want_msgs, limit):
    """Polls the persisted counts until they reach what was accepted and stay put, or
    stop moving for a while, or the deadline passes. Returns (chats, messages, seconds)."""
    start = time.monotonic()
    deadline = start + limit
    last, still_since = None, time.monotonic()
    while True:
        try:
            got = persisted_totals(tokens)
        except RuntimeError as e:
            log(f"drain: {e}")
            got = None
        t = time.monotonic()
        if got != last:
            last, still_since = got, t
        if got and got[0] >= want_chats and got[1] >= want_msgs and t - still_since >= 1.5:
            break
        if got and t - still_since >= 15:
            log("drain: persisted counts stopped moving below what was accepted")
            break
        if t >= deadline:
            log("drain: deadline reached")
            break
        time.sleep(0.5)
    return (last or (0, 0)) + (time.monotonic() - start,)


class Verdict:
    def __init__(self):
        self.violations = []
        self.warnings = []

    def fail(self, check, msg, examples=()):
        examples = list(examples)
        shown = "".join(f"\n      - {e}" for e in examples[:8])
        if len(examples) > 8:
            shown += f"\n      - ... {len(examples) - 8} more"
        self.violations.append(f"[{check}] {msg}{shown}")

    def warn(self, msg):
        self.warnings.append(msg)


def check_persistence(v, load, tokens):
    """(1) every 201 is exactly one row with its number and text; (2) numbers are
    unique and gap-free per parent, and the Redis counters agree with them."""
    chats_201, msgs_201 = {}, {}
    dup_answers = []
    for r in load.records:
        if r.status != 201 or r.number is None:
            continue
        if r.kind == "chat":
            key, table = (r.token, r.number), chats_201
        elif r.kind == "message":
            key, table = (r.token, r.chat, r.number), msgs_201
        else:
            continue
        if key in table:
            dup_answers.append(f"{key[1:]} given to {table[key]!r} and {r.text!r}")
        table[key] = r.text
    if dup_answers:
        v.fail(2, "the API answered 201 with the same number twice", dup_answers)
    bad_echo = [f"{r.kind} {r.text}: {r.detail}" for r in load.records
                if r.status == 201 and r.detail]
    if bad_echo:
        v.fail(1, "201 answers that do not echo what was sent", bad_echo)

    chat_rows = {}
    for token, number, title in sql(
            f"""SELECT a.token, c.number, c.title FROM chat_system.chats c
                JOIN chat_system.applications a ON a.id = c.application_id
                WHERE a.token IN ({in_list(tokens)})"""):
        chat_rows[(token, int(number))] = title
    msg_rows = {}
    for token, chat, number, body in sql(
            f"""SELECT a.token, m.chat_number, m.number, m.body FROM chat_system.messages m
                JOIN chat_system.applications a ON a.id = m.application_id
                WHERE a.token IN ({in_list(tokens)})"""):
        msg_rows[(token, int(chat), int(number))] = body

    failed_texts = {r.text for r in load.records
                    if r.kind in ("chat", "message") and r.status != 201}
    for what, accepted, rows in (("chat", chats_201, chat_rows), ("message", msgs_201, msg_rows)):
        lost = [f"{k[1:]} {t!r}" for k, t in accepted.items() if k not in rows]
        wrong = [f"{k[1:]} sent {t!r}, stored {rows[k]!r}" for k, t in accepted.items()
                 if k in rows and rows[k] != t]
        seen = {}
        for k, t in rows.items():
            seen.setdefault(t, []).append(k[1:])
        duplicated = [f"{t!r} at {ks}" for t, ks in seen.items() if len(ks) > 1]
        accepted_texts = {r.text for r in load.records if r.kind == what and r.status == 201}
        after_503 = [f"{k[1:]} {t!r}" for k, t in rows.items()
                     if t not in accepted_texts and t in failed_texts]
        phantom = [f"{k[1:]} {t!r}" for k, t in rows.items()
                   if t not in accepted_texts and t not in failed_texts]
        if lost:
            v.fail(1, f"{len(lost)} accepted {what}s are missing from MySQL", lost)
        if wrong:
            v.fail(1, f"{len(wrong)} {what}s stored with another text than accepted", wrong)
        if duplicated:
            v.fail(1, f"{len(duplicated)} {what} texts are stored more than once", duplicated)
        if phantom:
            v.fail(1, f"{len(phantom)} {what} rows match no request that was sent", phantom)
        if after_503:
            v.warn(f"{len(after_503)} {what}s were persisted although their create was "
                   f"answered with an error (outcome unknown to the client): "
                   + "; ".join(after_503[:5]))

    # (2) gap-free numbering per parent, in MySQL and against the Redis counters.
    chats_of = {}
    for token, number in chat_rows:
        chats_of.setdefault(token, set()).add(number)
    msgs_of = {}
    for token, chat, number in msg_rows:
        msgs_of.setdefault((token, chat), set()).add(number)
    gaps = []
    for token, numbers in chats_of.items():
        if numbers != set(range(1, max(numbers) + 1)):
            missing = sorted(set(range(1, max(numbers) + 1)) - numbers)
            gaps.append(f"app {token[:8]}… chats missing {missing[:10]}")
    for (token, chat), numbers in msgs_of.items():
        if numbers != set(range(1, max(numbers) + 1)):
            missing = sorted(set(range(1, max(numbers) + 1)) - numbers)
            gaps.append(f"app {token[:8]}… chat {chat} messages missing {missing[:10]}")
    if gaps:
        v.fail(2, "numbers with gaps in MySQL", gaps)
    orphans = [f"{k}" for k in msgs_of if k not in chat_rows]
    if orphans:
        v.fail(2, "messages persisted in chats that have no row", orphans)

    counters = queue_status(tokens)["counters"]
    got_want = []
    for token in tokens:
        got_want.append((f"app {token[:8]}… chat counter", counters[token]["chats"],
                         max(chats_of.get(token, {0}))))
    for (token, number) in sorted(chat_rows):
        got_want.append((f"app {token[:8]}… chat {number} message counter",
                         counters[token]["messages"].get(str(number)),
                         max(msgs_of.get((token, number), {0}))))
    mismatched = []
    for what, got, want in got_want:
        if got != want:
            mismatched.append(f"{what}: Redis {'missing' if got is None else got}, MySQL max {want}")
    if mismatched:
        v.fail(2, "Redis counters disagree with the highest persisted number", mismatched)
    return chats_201, msgs_201, chat_rows, msg_rows


def check_counts(v, tokens, limit):
    """(3) the stored counts reach the real counts within the deadline."""
    deadline = time.monotonic() + limit
    start = time.monotonic()
    while True:
        off = []
        for token, stored, real in sql(
                f"""SELECT a.token, a.chats_count,
                      (SELECT COUNT(*) FROM chat_system.chats c WHERE c.application_id = a.id)
                    FROM chat_system.applications a WHERE a.token IN ({in_list(tokens)})"""):
            if stored != real:
                off.append(f"app {token[:8]}… chats_count {stored}, real {real}")
        for token, number, stored, real in sql(
                f"""SELECT a.token, c.number, c.messages_count,
                      (SELECT COUNT(*) FROM chat_system.messages m
                        WHERE m.application_id = c.application_id AND m.chat_number = c.number)
                    FROM chat_system.chats c JOIN chat_system.applications a
                      ON a.id = c.application_id WHERE a.token IN ({in_list(tokens)})"""):
            if stored != real:
                off.append(f"app {token[:8]}… chat {number} messages_count {stored}, real {real}")
        if not off:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            v.fail(3, f"{len(off)} counts still differ from the real counts after {limit:.0f} s",
                   off)
            return None
        time.sleep(0.5)


def check_search(v, load, faults, sample_size, limit):
    """(4) a sample of accepted messages is found again by search, within the deadline.
    A third of the sample comes from the times the index-holding worker was down (killed),
    a third from the search outage (frozen), the rest from any time."""
    accepted = [r for r in load.records if r.kind == "message" and r.status == 201
                and r.number is not None]
    if not accepted:
        v.fail(4, "no accepted message to search for")
        return 0, 0, 0, None
    rng = random.Random(7)
    holder_down = [(f.down_from, f.t_end + 2) for f in faults
                   if f.name == "kill -9 worker" and "index writer holder" in f.detail.split(";")[0]]
    frozen = [(f.down_from, f.t_end + 2) for f in faults if f.name == "search outage"]
    sample, chosen = [], set()
    for windows in (holder_down, frozen):
        during = [r for r in accepted if any(a <= r.t0 <= b for a, b in windows)]
        picked = rng.sample(during, min(len(during), sample_size // 3))
        sample.append(picked)
        chosen.update(picked)
    rest = [r for r in accepted if r not in chosen]
    everything = sample[0] + sample[1]
    everything += rng.sample(rest, min(len(rest), sample_size - len(everything)))
    pending, wrong, seconds = search_for(everything, limit)
    if wrong:
        v.fail(4, "search answers with wrong content", wrong)
    if pending:
        v.fail(4, f"{len(pending)} of {len(everything)} sampled messages not found by search "
                  f"within {limit:.0f} s",
               [f"{r.text!r} (chat {r.chat} #{r.number}, created at {r.t0:.1f}s)" for r in pending])
    return len(everything), len(sample[0]), len(sample[1]), seconds


def dependency_windows(faults):
    return [(f.dependency, f.t_begin - 0.2, f.t_end + GRACE) for f in faults if f.dependency]


def grouped(records, faults):
    """Failed requests grouped by kind, status and answer: count, when, where, how slow,
    and the fault they overlapped."""
    groups = {}
    for r in records:
        groups.setdefault((r.kind, r.status, r.detail), []).append(r)
    out = []
    for (kind, status, detail), rs in sorted(groups.items(), key=lambda g: g[1][0].t0):
        t0, t1 = min(r.t0 for r in rs), max(r.t1 for r in rs)
        near = [f.name for f in faults if f.t_begin <= t1 and t0 <= (f.t_end or t1)]
        near = near or [f"{f.name} (+{GRACE:.0f} s)" for f in faults
                        if f.t_begin <= t1 and t0 <= (f.t_end or t1) + GRACE]
        apis = ",".join(sorted({f"api{r.api + 1}" for r in rs}))
        out.append(f"{len(rs)} × {kind} → {status} from {t0:.2f}s to {t1:.2f}s via {apis}, "
                   f"latency ≤ {max(r.latency for r in rs) * 1000:.0f} ms, during "
                   f"{' + '.join(near) or 'no fault'}: {detail[:160]}")
    return out


def check_failures(v, load, faults):
    """(5) every failed request is a fast 503 during a dependency outage; creates keep
    working with MariaDB down."""
    windows = dependency_windows(faults)
    hangs, five_hundreds, slow_503, stray_503, other = [], [], [], [], []
    for r in load.records:
        if r.status in (200, 201):
            continue
        if not isinstance(r.status, int):
            hangs.append(r)
        elif r.status == 503:
            if r.latency >= FAST:
                slow_503.append(r)
            if not any(a <= r.t1 and r.t0 <= b for _, a, b in windows):
                stray_503.append(r)
        elif r.status >= 500:
            five_hundreds.append(r)
        else:
            other.append(r)
    hangs, five_hundreds, slow_503, stray_503, other = map(
        lambda rs: grouped(rs, faults), (hangs, five_hundreds, slow_503, stray_503, other))
    count = lambda groups: sum(int(g.split(" ", 1)[0]) for g in groups)
    hangs_n, five_n, slow_n, stray_n, other_n = map(
        count, (hangs, five_hundreds, slow_503, stray_503, other))
    if hangs:
        v.fail(5, f"{hangs_n} requests hung (no answer in {CLIENT_TIMEOUT:.0f} s) "
                  "or lost their connection", hangs)
    if five_hundreds:
        v.fail(5, f"{five_n} answers were 5xx other than 503", five_hundreds)
    if slow_503:
        v.fail(5, f"{slow_n} 503s took {FAST:.0f} s or more", slow_503)
    if stray_503:
        v.fail(5, f"{stray_n} 503s while every dependency was up (workers killed or "
                  "frozen and connection floods must not affect the API)", stray_503)
    if other:
        v.fail(5, f"{other_n} unexpected error answers", other)

    per_fault = []
    for f in faults:
        a, b = (f.t_begin - 0.2, f.t_end + GRACE) if f.dependency else (f.t_begin, f.t_end)
        creates = [r for r in load.records if r.kind in ("chat", "message")
                   and r.t0 <= b and a <= r.t1]
        ok = sum(1 for r in creates if r.status == 201)
        n503 = sum(1 for r in creates if r.status == 503)
        reads = [r for r in load.records if r.kind.startswith("get-") and r.t0 <= b and a <= r.t1]
        reads_503 = sum(1 for r in reads if r.status == 503)
        per_fault.append((f, len(creates), ok, n503, len(reads), reads_503))
        if f.dependency == "mysql":
            down = [r for r in load.records if r.kind == "message"
                    and f.down_from <= r.t0 and r.t1 <= f.down_to]
            if not any(r.status == 201 for r in down):
                v.fail(5, f"no message create succeeded while MariaDB was down "
                          f"({f.down_from:.1f}s to {f.down_to:.1f}s; {len(down)} tried)")
            f.creates_while_down = (sum(1 for r in down if r.status == 201), len(down))
            app_reads = [r for r in load.records if r.kind == "get-app"
                         and f.down_from + 0.5 <= r.t0 and r.t1 <= f.down_to]
            f.app_reads_while_down = (sum(1 for r in app_reads if r.status == 503), len(app_reads))
            served = [r for r in app_reads if r.status == 200]
            if served:
                v.warn(f"{len(served)} GET /applications/{{token}} answered 200 while MariaDB "
                       "was down (from a cache?)")
    return per_fault


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


def check_flood(v, fault):
    """(6) during the flood a normal client is served within 1 s, never with a 5xx; the
    flood was held; the server closed its connections after HEADER_READ_TIMEOUT."""
    flood, probes = fault.flood, fault.probes
    latencies = [r.latency for r in probes]
    p99, worst = percentile(latencies, 0.99), max(latencies, default=0.0)
    failed = [r for r in probes if r.status not in (200, 201)]
    if not probes:
        v.fail(6, "the normal client sent no request during the flood")
    if failed:
        v.fail(6, f"{len(failed)} of {len(probes)} normal-client requests failed during "
                  "the flood", grouped(failed, [fault]))
    if worst >= 1.0:
        v.fail(6, f"normal-client latency during the flood: p99 {p99 * 1000:.0f} ms, max "
                  f"{worst * 1000:.0f} ms (bound: under 1 s)",
               [f"{r.kind} → {r.status} at {r.t0:.2f}s in {r.latency * 1000:.0f} ms"
                for r in sorted(probes, key=lambda r: -r.latency)[:5]])
    if flood.peak < 0.95 * flood.n:
        v.fail(6, f"the driver held only {flood.peak} of {flood.n} connections at once "
                  f"(connect errors: {flood.open_errors or 'none'})")
    gauge_peak = max((g for _, g in fault.gauge), default=None)
    if gauge_peak is None:
        v.fail(6, "api1's /metrics never answered during the flood")
    elif gauge_peak < 0.9 * flood.peak:
        v.warn(f"http_connections_open peaked at {gauge_peak:.0f} while the driver held "
               f"{flood.peak} connections")
    ages = sorted(age for _, age, _ in flood.closed_by_server)
    late_bound = HEADER_READ_TIMEOUT + 2.0
    late = [a for a in ages if a > late_bound]
    overdue = [a for a in flood.left_open if a > late_bound]
    if fault.t_end - fault.t_begin > late_bound and not ages:
        v.fail(6, "the server closed none of the flood's connections "
                  f"(HEADER_READ_TIMEOUT {HEADER_READ_TIMEOUT:.0f} s)")
    if late or overdue:
        v.fail(6, f"{len(late) + len(overdue)} flood connections stayed open longer than "
                  f"HEADER_READ_TIMEOUT + 2 s ({len(late)} closed late, up to "
                  f"{max(late, default=0):.1f} s; {len(overdue)} still open at the end, up to "
                  f"{max(overdue, default=0):.1f} s)")
    early = [a for a in ages if a < HEADER_READ_TIMEOUT - 0.5]
    if early:
        v.warn(f"{len(early)} flood connections were closed before HEADER_READ_TIMEOUT "
               f"(the earliest after {min(early):.2f} s)")
    if flood.answered:
        v.warn(f"the server answered {len(flood.answered)} unfinished request heads "
               f"(e.g. {flood.answered[0]!r}) instead of closing without an answer")
    idle = sum(1 for _, _, slow in flood.closed_by_server if not slow)
    first = min((t for t, _, _ in flood.closed_by_server), default=None)
    held = f"held at peak: {flood.peak} by the driver's count"
    if flood.full_at is not None:
        held += f" (all {flood.n} open {flood.full_at - fault.t_begin:.1f} s in)"
    held += (", " + ("no answer" if gauge_peak is None else f"{gauge_peak:.0f}")
             + " by api1's http_connections_open")
    closed = f"{flood.opened} opened in all; the server closed {len(ages)}"
    if ages:
        closed += (f" ({idle} idle, {len(ages) - idle} slow), the first "
                   f"{first - fault.t_begin:.1f} s into the flood, at ages min/median/max "
                   f"{ages[0]:.1f}/{statistics.median(ages):.1f}/{ages[-1]:.1f} s")
    closed += (f" (HEADER_READ_TIMEOUT {HEADER_READ_TIMEOUT:.0f} s); {len(flood.left_open)} "
               "closed by the driver at the end")
    connects = fault.connects
    fault.figures = [
        held,
        f"opened at most {Flood.OPEN_RATE}/s; {flood.slow_connects} of the flood's connects "
        "took 0.5 s or more",
        closed,
        f"normal client on api1 (a new connection each): {len(probes)} requests "
        f"({sum(1 for r in probes if r.kind == 'get-healthz')} /healthz, "
        f"{sum(1 for r in probes if r.kind == 'message')} creates), p99 {p99 * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms, {len(failed)} failed; its connects: max "
        f"{max(connects, default=0) * 1000:.0f} ms, "
        f"{sum(1 for c in connects if c >= 0.5)} of {len(connects)} took 0.5 s or more",
        "kernel (host-wide) during the flood: "
        + ", ".join(f"{k} +{n}" for k, n in fault.tcp_delta.items()),
    ]
    return p99, worst


def check_maxmemory(v, load, fault):
    """(7) with Redis at maxmemory, creates get a fast 503 /problems/overloaded with
    Retry-After, reads go on, /readyz says `queue: full`; creates come back after."""
    a, b = fault.t_begin - 0.2, fault.t_end + GRACE
    window = [r for r in load.records if r.t0 <= b and a <= r.t1]
    creates = [r for r in window if r.kind in ("chat", "message")]
    refused = [r for r in creates if r.status == 503]
    overloaded = [r for r in refused if r.problem_type == "/problems/overloaded"]
    other_503 = [r for r in refused if r.problem_type != "/problems/overloaded"]
    no_retry = [r for r in refused if not (r.retry_after or "").strip().isdigit()]
    reads = [r for r in window if r.kind.startswith("get-")]
    bad_reads = [r for r in reads if r.status != 200]
    if not overloaded:
        v.fail(7, f"no create was refused with /problems/overloaded while Redis was at "
                  f"maxmemory ({len(creates)} creates, {len(refused)} × 503)")
    if other_503:
        v.fail(7, f"{len(other_503)} creates refused with another problem than "
                  "/problems/overloaded while Redis was at maxmemory", grouped(other_503, [fault]))
    if no_retry:
        v.fail(7, f"{len(no_retry)} 503s without a Retry-After header", grouped(no_retry, [fault]))
    if bad_reads:
        v.fail(7, f"{len(bad_reads)} of {len(reads)} reads failed while Redis was at maxmemory",
               grouped(bad_reads, [fault]))
    full = [t for t, _, status, queue in fault.readyz if status == 503 and queue == "full"]
    if not full:
        v.fail(7, f"/readyz never answered 503 with queue: full while Redis was at maxmemory "
                  f"({len(fault.readyz)} polls: "
                  f"{sorted({(s, q) for _, _, s, q in fault.readyz}, key=str)})")
    if fault.recovered_in is None:
        v.fail(7, "no create succeeded within 10 s after maxmemory was restored")
    retry_values = sorted({r.retry_after for r in overloaded if r.retry_after})
    fault.figures = [
        f"creates overlapping the window (+{GRACE:.0f} s): {len(creates)}: "
        f"{sum(1 for r in creates if r.status == 201)} × 201, {len(overloaded)} × 503 "
        f"/problems/overloaded (Retry-After: {', '.join(retry_values) or 'none'}, slowest "
        f"{max((r.latency for r in refused), default=0) * 1000:.0f} ms), {len(other_503)} × other 503, "
        f"{sum(1 for r in creates if r.status not in (201, 503))} × other",
        f"reads: {len(reads)}, {len(bad_reads)} failed; /readyz: {len(full)} of "
        f"{len(fault.readyz)} polls 503 with queue: full, the first "
        + (f"{full[0] - fault.down_from:.1f} s after the change" if full else "never"),
        "creates back " + ("NO" if fault.recovered_in is None else
                           f"{fault.recovered_in:.2f} s") + " after the restore",
    ]
    return len(overloaded)


def check_search_outage(v, load, fault):
    """(8) with the indexer frozen, creates go on, the stream (and so Redis memory) stays
    bounded because it is trimmed past the indexer, and after it resumes every message of
    the outage is searchable (a sample, its first and last ones included)."""
    span = max(1e-3, fault.down_to - fault.down_from)
    creates = [r for r in load.records if r.kind in ("chat", "message")
               and fault.down_from <= r.t0 <= fault.down_to]
    ok = sum(1 for r in creates if r.status == 201)
    # Entries stay in the stream until they are older than INDEX_LAG_MAX (plus a trim
    # period, and a frozen consumer's entries until they are claimed): allow twice that.
    bound = int(ok / span * 2 * (INDEX_LAG_MAX + CLAIM_IDLE + 1.0)) + 100
    peak_used = max(fault.samples, key=lambda s: s[1], default=(0, 0, 0))
    peak_len = max(fault.samples, key=lambda s: s[2], default=(0, 0, 0))
    if not ok:
        v.fail(8, f"no create succeeded during the search outage ({len(creates)} tried)")
    if not fault.samples:
        v.fail(8, "Redis could not be sampled during the search outage")
    elif peak_len[2] > bound:
        v.fail(8, f"the stream reached {peak_len[2]} entries during the search outage "
                  f"(bound {bound}: {2 * (INDEX_LAG_MAX + CLAIM_IDLE + 1):.0f} s of creates; "
                  f"{ok} creates in {span:.0f} s)")
    if fault.trimmed_past <= 0:
        v.fail(8, "the stream was never trimmed past the frozen indexer "
                  "(index_trimmed_past_total of the other worker did not grow)")
    # A long outage must not let memory creep up: the median of its last minute against
    # the median of its second minute (the first holds the climb to INDEX_LAG_MAX).
    if span >= 180:
        second = [u for t, u, _ in fault.samples if 60 <= t - fault.down_from < 120]
        last = [u for t, u, _ in fault.samples if t - fault.down_from >= span - 60]
        if second and last:
            m2, ml = statistics.median(second), statistics.median(last)
            fault.trend = (m2, ml)
            if ml > m2 * 1.25 and ml - m2 > 8 * 1048576:
                v.fail(8, f"Redis memory grew during the search outage: median {mib(m2)} in "
                          f"its second minute, {mib(ml)} in its last")
    if fault.wrong:
        v.fail(8, "search answers with wrong content after the outage", fault.wrong)
    if fault.not_found:
        v.fail(8, f"{len(fault.not_found)} of {len(fault.sample)} messages created during the "
                  "search outage not searchable after it",
               [f"{r.text!r} (chat {r.chat} #{r.number}, created at {r.t0:.1f}s)"
                for r in fault.not_found])
    if fault.caught_up <= 0:
        v.fail(8, "the resumed indexer did not catch up from MySQL (index_caught_up_total "
                  "did not grow)")
    fault.figures = [
        f"creates during the outage: {len(creates)}, {ok} × 201 ({fault.created} messages)",
        f"Redis used_memory: {mib(fault.baseline[0])} before, peak {mib(peak_used[1])} "
        f"({peak_used[0] - fault.down_from:.0f} s in); stream: {fault.baseline[1]} entries "
        f"before, peak {peak_len[2]} ({peak_len[0] - fault.down_from:.0f} s in; bound {bound})"
        + (f"; median used_memory 2nd minute {mib(fault.trend[0])}, last minute "
           f"{mib(fault.trend[1])}" if getattr(fault, "trend", None) else ""),
        "trimmed past the indexer: gap marked "
        + ("never" if fault.gap_at is None else f"{fault.gap_at:.0f} s in")
        + f", index_trimmed_past_total +{fault.trimmed_past:.0f}",
        f"after SIGCONT: {fault.caught_up:.0f} messages indexed from MySQL; "
        f"{len(fault.sample) - len(fault.not_found)} of {len(fault.sample)} sampled outage "
        "messages searchable "
        + ("(NOT all)" if fault.searchable_in is None else f"{fault.searchable_in:.1f} s after SIGCONT"),
    ]
    return peak_used[1], peak_len[2]


def check_processes(v, stack):
    for proc in stack.procs:
        if not proc.killed_by_us and not proc.alive():
            v.fail("procs", f"{proc.name} exited by itself with status {proc.popen.returncode}; "
                            f"see {proc.log_path}", proc.log_text().splitlines()[-5:])
    holders = [w.name for w in stack.workers if w.holds_writer]
    if len(holders) != 1:
        v.fail(4, f"{len(holders)} live workers hold the index writer: {holders}")
    # 5xx answers are logged at ERROR by the HTTP trace layer, 503s included: only
    # internal errors and panics count here, grouped by message.
    problems = {}
    for proc in stack.procs:
        for line in ANSI.sub("", proc.log_text()).splitlines():
            if "panicked" in line or "internal error" in line:
                message = line.split(" ", 1)[-1].strip()[:300]
                problems.setdefault(message, []).append(proc.name)
    if problems:
        v.fail("logs", f"{sum(map(len, problems.values()))} internal-error or panic lines in "
                       "the logs", [f"{len(procs)} × in {','.join(sorted(set(procs)))}: {m}"
                                    for m, procs in problems.items()])


def queue_state():
    """Dead letters and the pending/lag of each consumer group, over every shard."""
    status = queue_status()
    groups = {g["name"]: {"pending": str(g["pending"]), "lag": str(g["lag"])}
              for g in status["groups"]}
    return status["dead_letters"], groups


# ---- the run ------------------------------------------------------------------------------

def schedule(short, cluster=False):
    """(start at, fault) pairs, in seconds after the load began (a fault starts when the
    one before it is over, if that is later), the load's shortest length, and the sizes of
    the last three faults. On a cluster, a master killed and restarted takes the place of
    the single Redis's restart and of its maxmemory window."""
    if cluster:
        if short:
            return ([(2, "kill-holder"), (10, "kill-other"), (13, "master"), (22, "mysql"),
                     (34, "flood"), (44, "search-outage")], 30.0,
                    dict(flood=1000, flood_s=8.0, master_s=6.0, outage_s=20.0))
        return ([(8, "kill-holder"), (22, "kill-other"), (32, "master"), (52, "mysql"),
                 (66, "flood"), (86, "search-outage")], 90.0,
                dict(flood=5000, flood_s=15.0, master_s=15.0, outage_s=600.0))
    if short:
        return ([(2, "kill-holder"), (10, "kill-other"), (13, "kill-holder-again"),
                 (16, "redis"), (19, "mysql"), (31, "flood"), (41, "maxmemory"),
                 (50, "search-outage")], 30.0,
                dict(flood=1000, flood_s=8.0, maxmemory_s=5.0, outage_s=20.0))
    return ([(8, "kill-holder"), (22, "kill-other"), (32, "kill-holder-again"),
             (44, "redis"), (58, "mysql"), (72, "flood"), (92, "maxmemory"),
             (108, "search-outage")], 90.0,
            dict(flood=5000, flood_s=15.0, maxmemory_s=10.0, outage_s=600.0))


def main():
    global T0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", required=True, help="the chat-system binary")
    p.add_argument("--short", action="store_true", help="~30 s of load with the same faults")
    p.add_argument("--rate", type=float, default=300, help="creates per second (default 300)")
    p.add_argument("--threads", type=int, default=8, help="load threads (default 8)")
    p.add_argument("--mysql-down", type=float, default=10, help="seconds MariaDB stays down")
    p.add_argument("--flood", type=int, help="connections of the flood (full 5000, short 1000)")
    p.add_argument("--outage", type=float,
                   help="seconds the index writer's holder stays frozen (full 600, short 20)")
    p.add_argument("--cluster", action="store_true",
                   help="run on a 3-master Redis Cluster, and kill one master under load")
    args = p.parse_args()
    global CLUSTER
    CLUSTER = args.cluster
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    faults_plan, duration, sizes = schedule(args.short, args.cluster)
    if args.flood is not None:
        sizes["flood"] = args.flood
    if args.outage is not None:
        sizes["outage_s"] = args.outage
    # The flood's sockets, the load's and a margin.
    open_files = raise_open_files(sizes["flood"] + 256)
    flood_note = None
    if open_files != resource.RLIM_INFINITY and open_files < sizes["flood"] + 256:
        flood_note = (f"the open-files limit ({open_files}, ulimit -Hn) cut the flood from "
                      f"{sizes['flood']} to {open_files - 256} connections")
        sizes["flood"] = open_files - 256
    run = secrets.token_hex(3)
    started = time.monotonic()
    DATA.mkdir(parents=True, exist_ok=True)
    cleanup_leftovers()
    for old in DATA.glob("*.log"):
        old.unlink()
    subprocess.run(["rm", "-rf", str(DATA / "index")], check=True)
    PIDFILE.write_text("")

    stack = Stack(args.bin)
    if CLUSTER:
        stack.env["REDIS_CLUSTER_NODES"] = ",".join(f"127.0.0.1:{p}" for p in MASTERS)
    global QUEUE_STATUS
    QUEUE_STATUS = (args.bin, stack.env)
    load = None
    v = Verdict()
    if flood_note:
        v.warn(flood_note)
    faults = []
    try:
        log(f"run {run}: starting MariaDB :{MYSQL_PORT} and Redis :{REDIS_PORT}")
        deps("start")
        # A clean slate on these private instances.
        sql("DROP DATABASE IF EXISTS chat_system")
        for port in [REDIS_PORT] + (MASTERS if CLUSTER else []):
            redis("FLUSHALL", port=port)
            # FLUSHALL only appends to the AOF: rewrite it, so a restart loads this run's
            # data and not every earlier run's history too.
            redis("BGREWRITEAOF", port=port)
            deadline = time.monotonic() + 30
            while ("aof_rewrite_in_progress:1" in redis("INFO", "persistence", port=port)
                   and time.monotonic() < deadline):
                time.sleep(0.1)
        stack.migrate()
        w1 = stack.start_worker()  # first: takes the index writer
        w2 = stack.start_worker()
        if not w1.holds_writer or w2.holds_writer:
            raise SystemExit(f"chaos: expected {w1.name} to hold the index writer and "
                             f"{w2.name} not (got {w1.holds_writer}, {w2.holds_writer})")
        for i in range(len(APIS)):
            stack.start_api(i)
        log("stack up: api1, api2, worker1 (index writer), worker2")

        setup = Client(APIS[0])
        tokens = []
        masters = {}
        # On a cluster: applications until two masters serve at least one each (the
        # first application's master is the one killed).
        while len(tokens) < 3 or (CLUSTER and len(set(masters.values())) < 2):
            i = len(tokens)
            status, raw = setup.request("POST", "/applications", {"name": f"chaos-{run}-app{i}"})
            if status != 201:
                raise SystemExit(f"chaos: creating an application answered {status}: {raw[:200]!r}")
            tokens.append(json.loads(raw)["token"])
            if CLUSTER:
                masters[tokens[-1]] = master_of(tokens[-1])
            if len(tokens) > 30:
                raise SystemExit("chaos: 30 applications, all on one master")
        setup.close()
        if CLUSTER:
            log(f"applications per master: "
                f"{ {p: sum(1 for m in masters.values() if m == p) for p in MASTERS} }")

        T0 = time.monotonic()
        load = Load(run, tokens, args.rate, args.threads, chat_share=0.05)
        for i, token in enumerate(tokens * 3):
            load.create_chat(Client(APIS[i % 2]), i % 2, token)
        load.start()
        log(f"load: {args.rate:.0f} creates/s over {args.threads} threads and both APIs, "
            f"{duration:.0f} s")
        last_fault_end = 0.0
        for at, what in faults_plan:
            time.sleep(max(0.0, at - now()))
            if what == "kill-holder":
                kill_worker(stack, faults, "holder", down=5)
            elif what == "kill-other":
                kill_worker(stack, faults, "other", down=1)
            elif what == "kill-holder-again":
                kill_worker(stack, faults, "holder", down=1)
            elif what == "redis":
                restart_redis(faults)
            elif what == "master":
                kill_master(faults, masters[tokens[0]], sizes["master_s"])
            elif what == "mysql":
                stop_mysql(faults, args.mysql_down)
            elif what == "flood":
                flood_connections(stack, load, faults, sizes["flood"], sizes["flood_s"])
            elif what == "maxmemory":
                fill_redis(load, faults, sizes["maxmemory_s"])
            elif what == "search-outage":
                freeze_indexer(stack, load, faults, sizes["outage_s"],
                               search_limit=60 if args.short else 180)
            last_fault_end = now()
        # Some load after the last recovery, so the recovered path is exercised too.
        time.sleep(max(0.0, max(duration, last_fault_end + 3) - now()))
        load.finish()
        load_seconds = now()
        log(f"load stopped after {load_seconds:.1f} s; waiting for the queue to drain")

        creates = [r for r in load.records if r.kind in ("chat", "message")]
        ok_chats = sum(1 for r in creates if r.kind == "chat" and r.status == 201)
        ok_msgs = sum(1 for r in creates if r.kind == "message" and r.status == 201)
        rows_chats, rows_msgs, drain_s = wait_drained(tokens, ok_chats, ok_msgs,
                                                      45 if args.short else 60)
        log(f"drained in {drain_s:.1f} s: {rows_chats} chats, {rows_msgs} messages persisted")

        chats_201, msgs_201, chat_rows, msg_rows = check_persistence(v, load, tokens)
        counts_s = check_counts(v, tokens, 20)
        sampled, sampled_killed, sampled_frozen, search_s = check_search(
            v, load, faults, 75, 40)
        per_fault = check_failures(v, load, faults)
        for f in faults:
            if f.name == "connection flood":
                check_flood(v, f)
            elif f.name == "Redis at maxmemory":
                check_maxmemory(v, load, f)
            elif f.name == "Redis master killed":
                check_master(v, load, f, masters)
            elif f.name == "search outage":
                check_search_outage(v, load, f)
        check_processes(v, stack)
        dlq, groups = queue_state()
        if dlq:
            v.fail(1, f"{dlq} entries in the dead-letter streams")
        for name, g in groups.items():
            if g.get("pending", "0") != "0":
                v.warn(f"consumer group {name} still has {g['pending']} pending entries")

        failed = [r for r in creates + [r for r in load.records if r.kind.startswith("get-")]
                  if r.status not in (200, 201)]
        s5xx = sum(1 for r in failed if isinstance(r.status, int) and r.status >= 500)
        s503 = sum(1 for r in failed if r.status == 503)
        hangs = sum(1 for r in failed if not isinstance(r.status, int))
        max_failed = max((r.latency for r in failed), default=0.0)
        all_latency = sorted(r.latency for r in creates)
        p99 = all_latency[int(len(all_latency) * 0.99)] if all_latency else 0.0
        reads = [r for r in load.records if r.kind.startswith("get-")]

        lines = []
        out = lines.append
        out("")
        out(f"chaos summary — run {run} ({'short' if args.short else 'full'}), "
            f"{load_seconds:.0f} s of load, {time.monotonic() - started:.0f} s in all")
        out("")
        rows = [
            ("requests sent (creates)", f"{len(creates)}  ({len(creates) / load_seconds:.0f}/s)"),
            ("201s received", f"{ok_chats + ok_msgs}  ({ok_chats} chats, {ok_msgs} messages)"),
            ("rows found", f"{len(chat_rows) + len(msg_rows)}  ({len(chat_rows)} chats, "
                           f"{len(msg_rows)} messages)"),
            ("probe reads sent", f"{len(reads)}  (GET application / recent message; "
                                 "/healthz in the flood)"),
            ("faults injected", f"{len(faults)}"),
            ("5xx seen", f"{s5xx}"),
            ("503s seen", f"{s503}"),
            ("hangs / connection errors", f"{hangs}"),
            ("max latency of failed requests", f"{max_failed * 1000:.0f} ms"),
            ("create latency p99 / max", f"{p99 * 1000:.1f} ms / {max(all_latency, default=0) * 1000:.0f} ms"),
            ("queue drained in", f"{drain_s:.1f} s"),
            ("counts converged in", "NO" if counts_s is None else f"{counts_s:.1f} s"),
            ("search: sample found in", ("NO" if search_s is None else f"{search_s:.1f} s")
             + f"  ({sampled} sampled: {sampled_killed} from index-writer kills, "
               f"{sampled_frozen} from the search outage)"),
            ("dead-letter entries", f"{dlq}"),
        ]
        width = max(len(k) for k, _ in rows)
        out(f"  {'metric'.ljust(width)}  value")
        out(f"  {'-' * width}  {'-' * 30}")
        for k, val in rows:
            out(f"  {k.ljust(width)}  {val}")
        out("")
        out("  faults (seconds since the load began; creates and reads overlapping the fault,")
        out("  dependency faults with 3 s of grace after recovery):")
        for f, n, ok, n503, nr, r503 in per_fault:
            out(f"  {f.t_begin:6.1f}–{f.t_end:5.1f}s  {f.name}: {f.detail}")
            out(f"  {'':14}creates {n}: {ok} × 201, {n503} × 503; reads {nr}: {r503} × 503")
            for line in getattr(f, "figures", []):
                out(f"  {'':14}{line}")
            if hasattr(f, "split"):
                o_ok, o_n, m503, m_n = f.split
                out(f"  {'':14}while down: other masters' creates {o_ok}/{o_n} × 201, "
                    f"its own {m503}/{m_n} × 503")
            if f.dependency == "mysql":
                c_ok, c_n = f.creates_while_down
                a503, an = f.app_reads_while_down
                out(f"  {'':14}while certainly down: message creates {c_ok}/{c_n} × 201, "
                    f"GET application {a503}/{an} × 503")
        for name, g in groups.items():
            out(f"  consumer group {name}: pending {g.get('pending')}, lag {g.get('lag')}, "
                f"consumers {g.get('consumers')}")
        out("")
        for w in v.warnings:
            out(f"  warning: {w}")
        if v.violations:
            out(f"  FAILED: {len(v.violations)} violation(s)")
            for x in v.violations:
                out(f"  violation {x}")
        else:
            out("  PASSED: no violation (1 persisted exactly once, 2 numbers gap-free, "
                "3 counts converge, 4 search catches up, 5 fast 503s only, 6 served "
                "through the connection flood, "
                + ("8 search outage bounded and recovered, 9 a dead master refused only "
                   "its own applications)" if CLUSTER else
                   "7 overloaded not broken at maxmemory, 8 search outage bounded and "
                   "recovered)"))
        with open(DATA / "requests.csv", "w") as f:
            f.write("kind,api,start_s,end_s,latency_ms,status,token,chat,number,text,detail\n")
            for r in sorted(load.records, key=lambda r: r.t0):
                detail = (r.detail or "").replace(",", ";").replace("\n", " ")
                f.write(f"{r.kind},api{r.api + 1},{r.t0:.4f},{r.t1:.4f},{r.latency * 1000:.1f},"
                        f"{r.status},{r.token},{r.chat or ''},{r.number or ''},{r.text or ''},"
                        f"{detail}\n")
        text = "\n".join(lines)
        print(text, flush=True)
        (DATA / "summary.txt").write_text(text + "\n")
        return 1 if v.violations else 0
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        return 130
    finally:
        # Cleaning up is bounded; a second signal must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if load is not None:
            load.stop.set()
        stack.stop_all()
        try:
            deps("stop")
        except Exception as e:
            log(f"scripts/deps stop: {e}")


if __name__ == "__main__":
    sys.exit(main())
