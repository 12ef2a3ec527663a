"""The chaos run's private stack: MariaDB and Redis (scripts/deps), the `api` and `worker`
processes, and what is read from them (SQL rows, Redis replies, metrics, queue status)."""

import os
import pathlib
import re
import signal
import subprocess
import time

import common
from common import http_get

from .base import (APIS, CLAIM_IDLE, CLUSTER_PORT, DATA, DEPS_DIR, FIRST_WORKER_METRICS_PORT,
                   DATABASE_IDLE_TIMEOUT, HEADER_READ_TIMEOUT, INDEX_LAG_MAX, MASTERS, MYSQL_PORT, PIDFILE, PREFIX,
                   REDIS_PORT, RUN, log)

# ---- dependencies ---------------------------------------------------------------------

DEPS_ENV = common.deps_env(DEPS_DIR, MYSQL_PORT, REDIS_PORT)


def deps(action):
    # A session of its own: a Ctrl-C on the terminal must not kill mysqld behind our back.
    env = DEPS_ENV
    if RUN.cluster:
        # Every write fsynced: a master killed with -9 then loses nothing accepted, which
        # is what the checks below hold it to (with `everysec`, up to a second can go).
        env = dict(DEPS_ENV, DEPS_REDIS_CLUSTER_PORT=str(CLUSTER_PORT),
                   DEPS_REDIS_APPENDFSYNC="always")
    common.deps(action, env, start_new_session=True, timeout=90)


def sql(query, timeout=60):
    """Rows of a query, as lists of strings (NULL is the string NULL)."""
    out = subprocess.run(
        common.mariadb_argv(MYSQL_PORT, "--protocol=tcp", "-N", "-B", "--raw", "-e", query),
        capture_output=True, text=True, timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"mariadb: {out.stderr.strip()}")
    return [line.split("\t") for line in out.stdout.splitlines()]


def redis(*args, timeout=30, port=None):
    return common.redis_cli(port or REDIS_PORT, *args, timeout=timeout)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def metric(addr, name, timeout=2.0):
    """The sum of every series of a metric on a /metrics page (None if unreachable)."""
    try:
        text = common.metrics_text(addr, timeout=timeout)
    except OSError:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def queue_status(tokens=()):
    """`chat-system queue-status` as a dict (per shard and totals; counters of tokens)."""
    return common.queue_status(RUN.binary, RUN.env, tokens)


def queue_state():
    """Dead letters and the pending/lag of each consumer group, over every shard."""
    status = queue_status()
    groups = {g["name"]: {"pending": str(g["pending"]), "lag": str(g["lag"])}
              for g in status["groups"]}
    return status["dead_letters"], groups


def redis_memory():
    """Redis's used_memory (summed over the masters of a cluster) and the write queue's
    length."""
    ports = MASTERS if RUN.cluster else [REDIS_PORT]
    used = 0
    for port in ports:
        info = redis("INFO", "memory", port=port)
        used += int(re.search(r"^used_memory:(\d+)", info, re.M).group(1))
    return used, queue_status()["length"]


def master_of(token):
    """The port of the cluster master serving the application's shard."""
    slot = common.create_script(RUN.binary, RUN.env, token)["slot"]
    try:
        return common.slot_owner(common.cluster_slot_ranges(MASTERS[0]), slot)
    except LookupError:
        raise SystemExit(f"chaos: no master serves slot {slot}") from None


def fresh_dependencies():
    """A clean slate on the private MariaDB and Redis (every node of a cluster)."""
    sql("DROP DATABASE IF EXISTS chat_system")
    for port in [REDIS_PORT] + (MASTERS if RUN.cluster else []):
        redis("FLUSHALL", port=port)
        # FLUSHALL only appends to the AOF: rewrite it, so a restart loads this run's
        # data and not every earlier run's history too.
        redis("BGREWRITEAOF", port=port)
        deadline = time.monotonic() + 30
        while ("aof_rewrite_in_progress:1" in redis("INFO", "persistence", port=port)
               and time.monotonic() < deadline):
            time.sleep(0.1)


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
            common.stop_process(  # SIGCONT too, in case it was left frozen
                self.popen, 10, cont=True,
                on_kill=lambda: log(f"{self.name} did not stop within 10 s; killing it"))
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
            DATABASE_IDLE_TIMEOUT=f"{DATABASE_IDLE_TIMEOUT:.0f}s",
            COUNTS_SYNC_INTERVAL="1s",
            NO_COLOR="1",  # plain log files (tracing-subscriber honours it)
        )
        if RUN.cluster:
            self.env["REDIS_CLUSTER_NODES"] = ",".join(f"127.0.0.1:{p}" for p in MASTERS)
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

    def start_all(self):
        """migrate, two workers (the first takes the index writer), then both APIs."""
        self.migrate()
        w1 = self.start_worker()  # first: takes the index writer
        w2 = self.start_worker()
        if not w1.holds_writer or w2.holds_writer:
            raise SystemExit(f"chaos: expected {w1.name} to hold the index writer and "
                             f"{w2.name} not (got {w1.holds_writer}, {w2.holds_writer})")
        for i in range(len(APIS)):
            self.start_api(i)
        log("stack up: api1, api2, worker1 (index writer), worker2")

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


def prepare_data_dir():
    """.data/chaos emptied of an earlier run's logs, index and processes."""
    DATA.mkdir(parents=True, exist_ok=True)
    cleanup_leftovers()
    for old in DATA.glob("*.log"):
        old.unlink()
    subprocess.run(["rm", "-rf", str(DATA / "index")], check=True)
    PIDFILE.write_text("")
