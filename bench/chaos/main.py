"""The chaos run's command line and course: the stack, the applications, the load with
its faults on a schedule, the checks and the summary."""

import argparse
import json
import resource
import secrets
import signal
import time

import chaos

from . import checks, fault_checks, faults as inject, report
from .base import (APIS, DATA, MASTERS, MYSQL_PORT, REDIS_PORT, RUN, Interrupted, log, now,
                   on_term, start_clock)
from .load import Client, Load
from .stack import Stack, deps, fresh_dependencies, master_of, prepare_data_dir, queue_state


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


def parse_args():
    p = argparse.ArgumentParser(prog="chaos", description=chaos.__doc__.split("\n\n")[0])
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
    return p.parse_args()


def plan(args):
    """The schedule with the command line's sizes, cut to the open-files limit: (faults
    plan, load's shortest length, sizes, a note if the flood was cut)."""
    faults_plan, duration, sizes = schedule(args.short, args.cluster)
    if args.flood is not None:
        sizes["flood"] = args.flood
    if args.outage is not None:
        sizes["outage_s"] = args.outage
    # The flood's sockets, the load's and a margin.
    open_files = inject.raise_open_files(sizes["flood"] + 256)
    flood_note = None
    if open_files != resource.RLIM_INFINITY and open_files < sizes["flood"] + 256:
        flood_note = (f"the open-files limit ({open_files}, ulimit -Hn) cut the flood from "
                      f"{sizes['flood']} to {open_files - 256} connections")
        sizes["flood"] = open_files - 256
    return faults_plan, duration, sizes, flood_note


def create_applications(run):
    """The run's applications (tokens) and, on a cluster, the master serving each: until
    two masters serve at least one each (the first application's master is the one
    killed)."""
    setup = Client(APIS[0])
    tokens = []
    masters = {}
    while len(tokens) < 3 or (RUN.cluster and len(set(masters.values())) < 2):
        i = len(tokens)
        status, raw = setup.request("POST", "/applications", {"name": f"chaos-{run}-app{i}"})
        if status != 201:
            raise SystemExit(f"chaos: creating an application answered {status}: {raw[:200]!r}")
        tokens.append(json.loads(raw)["token"])
        if RUN.cluster:
            masters[tokens[-1]] = master_of(tokens[-1])
        if len(tokens) > 30:
            raise SystemExit("chaos: 30 applications, all on one master")
    setup.close()
    if RUN.cluster:
        log(f"applications per master: "
            f"{ {p: sum(1 for m in masters.values() if m == p) for p in MASTERS} }")
    return tokens, masters


class ChaosRun:
    """One run: its stack, its load, the faults injected and the verdict."""

    def __init__(self, args):
        self.args = args
        self.faults_plan, self.duration, self.sizes, flood_note = plan(args)
        self.run = secrets.token_hex(3)
        self.started = time.monotonic()
        prepare_data_dir()
        self.stack = Stack(args.bin)
        RUN.binary, RUN.env = args.bin, self.stack.env
        self.load = None
        self.faults = []
        self.tokens, self.masters = [], {}
        self.v = checks.Verdict()
        if flood_note:
            self.v.warn(flood_note)

    def inject(self, what):
        stack, load, faults, args, sizes = (self.stack, self.load, self.faults, self.args,
                                            self.sizes)
        if what == "kill-holder":
            inject.kill_worker(stack, faults, "holder", down=5)
        elif what == "kill-other":
            inject.kill_worker(stack, faults, "other", down=1)
        elif what == "kill-holder-again":
            inject.kill_worker(stack, faults, "holder", down=1)
        elif what == "redis":
            inject.restart_redis(faults)
        elif what == "master":
            inject.kill_master(faults, self.masters[self.tokens[0]], sizes["master_s"])
        elif what == "mysql":
            inject.stop_mysql(faults, args.mysql_down)
        elif what == "flood":
            inject.flood_connections(stack, load, faults, sizes["flood"], sizes["flood_s"])
        elif what == "maxmemory":
            inject.fill_redis(load, faults, sizes["maxmemory_s"])
        elif what == "search-outage":
            inject.freeze_indexer(stack, load, faults, sizes["outage_s"],
                                  search_limit=60 if args.short else 180)

    def run_load(self):
        """The load from its first chats to its end, with the faults injected on
        schedule; returns the load's length in seconds."""
        args = self.args
        start_clock()
        self.load = load = Load(self.run, self.tokens, args.rate, args.threads, chat_share=0.05)
        for i, token in enumerate(self.tokens * 3):
            load.create_chat(Client(APIS[i % 2]), i % 2, token)
        load.start()
        log(f"load: {args.rate:.0f} creates/s over {args.threads} threads and both APIs, "
            f"{self.duration:.0f} s")
        last_fault_end = 0.0
        for at, what in self.faults_plan:
            time.sleep(max(0.0, at - now()))
            self.inject(what)
            last_fault_end = now()
        # Some load after the last recovery, so the recovered path is exercised too.
        time.sleep(max(0.0, max(self.duration, last_fault_end + 3) - now()))
        load.finish()
        return now()

    def fault_checks(self):
        v, load = self.v, self.load
        for f in self.faults:
            if f.name == "connection flood":
                fault_checks.check_flood(v, f)
            elif f.name == "Redis at maxmemory":
                fault_checks.check_maxmemory(v, load, f)
            elif f.name == "Redis master killed":
                fault_checks.check_master(v, load, f, self.masters)
            elif f.name == "search outage":
                fault_checks.check_search_outage(v, load, f)

    def check_queue(self):
        dlq, groups = queue_state()
        if dlq:
            self.v.fail(1, f"{dlq} entries in the dead-letter streams")
        for name, g in groups.items():
            if g.get("pending", "0") != "0":
                self.v.warn(f"consumer group {name} still has {g['pending']} pending entries")
        return dlq, groups

    def run_checks(self):
        """Every check, once the queue has drained; the figures for the summary."""
        v, load, tokens = self.v, self.load, self.tokens
        creates = [r for r in load.records if r.kind in ("chat", "message")]
        ok_chats = sum(1 for r in creates if r.kind == "chat" and r.status == 201)
        ok_msgs = sum(1 for r in creates if r.kind == "message" and r.status == 201)
        rows_chats, rows_msgs, drain_s = checks.wait_drained(tokens, ok_chats, ok_msgs,
                                                             45 if self.args.short else 60)
        log(f"drained in {drain_s:.1f} s: {rows_chats} chats, {rows_msgs} messages persisted")

        _, _, chat_rows, msg_rows = checks.check_persistence(v, load, tokens)
        counts_s = checks.check_counts(v, tokens, 20)
        sampled, sampled_killed, sampled_frozen, search_s = checks.check_search(
            v, load, self.faults, 75, 40)
        per_fault = checks.check_failures(v, load, self.faults)
        self.fault_checks()
        checks.check_processes(v, self.stack)
        dlq, groups = self.check_queue()
        return report.Outcome(
            run=self.run, short=self.args.short,
            creates=creates, reads=[r for r in load.records if r.kind.startswith("get-")],
            ok_chats=ok_chats, ok_msgs=ok_msgs, chat_rows=chat_rows, msg_rows=msg_rows,
            faults=self.faults, per_fault=per_fault, drain_s=drain_s, counts_s=counts_s,
            search_s=search_s, sampled=sampled, sampled_killed=sampled_killed,
            sampled_frozen=sampled_frozen, dlq=dlq, groups=groups)

    def execute(self):
        """The run proper, from the dependencies' start to the summary; its exit status."""
        log(f"run {self.run}: starting MariaDB :{MYSQL_PORT} and Redis :{REDIS_PORT}")
        deps("start")
        fresh_dependencies()
        self.stack.start_all()
        self.tokens, self.masters = create_applications(self.run)
        load_seconds = self.run_load()
        log(f"load stopped after {load_seconds:.1f} s; waiting for the queue to drain")
        outcome = self.run_checks()
        outcome.load_seconds = load_seconds
        text = report.summary(outcome, self.v, time.monotonic() - self.started)
        report.write_requests(self.load.records)
        print(text, flush=True)
        (DATA / "summary.txt").write_text(text + "\n")
        return 1 if self.v.violations else 0

    def clean_up(self):
        # Cleaning up is bounded; a second signal must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.load is not None:
            self.load.stop.set()
        self.stack.stop_all()
        try:
            deps("stop")
        except Exception as e:
            log(f"scripts/deps stop: {e}")


def main():
    args = parse_args()
    RUN.cluster = args.cluster
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    course = ChaosRun(args)
    try:
        return course.execute()
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        return 130
    finally:
        course.clean_up()
