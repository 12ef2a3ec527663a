"""The chaos run's settings (paths, ports, time bounds), its clock and its log."""

import os
import re
import sys
import time

from common import ROOT

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

CLIENT_TIMEOUT = 5.0  # a request with no answer by then is a hang
FAST = 3.0  # a 503 slower than this is not "fast"
GRACE = 3.0  # after a dependency is back, clients may still see 503s this long
# Shorter than the defaults, so that each fault shows its recovery within the run.
HEADER_READ_TIMEOUT = 5.0  # the API closes a connection without a whole request head then
INDEX_LAG_MAX = 5.0  # past this lag the stream is trimmed past the (frozen) indexer
CLAIM_IDLE = 2.0  # a frozen or dead consumer's entries are taken over after this
# MySQL rolls back a transaction a frozen worker left open after this (its rows, and the
# entries they hold back, are free again).
DATABASE_IDLE_TIMEOUT = 5.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROBLEM_TYPE = re.compile(r'"type"\s*:\s*"([^"]*)"')


class Run:
    """What the command line and the stack decide for the whole run."""
    cluster = False  # --cluster
    # The stack's binary and environment, for `chat-system queue-status` and
    # `create-script`: the queue's state comes from the product's own report, never from
    # its Redis key names.
    binary = None
    env = None


RUN = Run()

_t0 = time.monotonic()  # reset when the load starts; every recorded time is relative to it


def start_clock():
    global _t0
    _t0 = time.monotonic()


def now():
    return time.monotonic() - _t0


def log(msg):
    print(f"chaos [{now():7.2f}s]: {msg}", file=sys.stderr, flush=True)


def mib(n):
    return f"{n / 1048576:.1f} MiB"


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


class Interrupted(Exception):
    pass


def on_term(signum, _frame):
    raise Interrupted(f"signal {signum}")
