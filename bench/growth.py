"""`scripts/bench --growth` and `scripts/bench --idle-after-load`, driven by bench/run.py.

Growth: the same scenarios on a small database and on a grown one, in one run.

1. A small data set is bulk-loaded straight into MariaDB (`LOAD DATA LOCAL INFILE`, not
   through the API) and indexed with `chat-system reindex`; the scenarios run on it.
2. The database is grown with the same loader to `--growth-messages` messages in
   `--growth-chats` chats over `--growth-apps` applications (default 10M / 1M / 10k),
   the index rebuilt from MySQL, and the same scenarios run again.

Both data sets have the same shape: every application has the same number of chats;
chat 1 of each holds 100 messages (the page and search scenarios read it), the others
share the rest of the application's messages. Rows are what the service would have
written: numbers gap-free from 1 in each parent, `chats_count` and `messages_count`
right, version 1. Redis holds nothing of them: each application's token and each
chat's counter are read back from MySQL at their first use (`MAX(number)`).

Scenarios (64 connections saturated; reads also paced, 16 connections, at the same rate on
both data sets, `PACED`: a latency compared across data sizes must be taken under the
same load):
* create message, 1,000 chats: a fixed set of chats spread over all the applications,
  each written once before the measure (their counters rebuilt), worker beside the API;
* create message, random chat: any chat of any application (on the grown set, nearly
  every create is the first of its chat since the load: counter rebuilt from MySQL);
* get message: any message of any chat (`GET .../messages/{n}`);
* list page (50): chat 1 of a random application, `limit=50` at a random offset;
* search: chat 1 of a random application, a random word of the vocabulary;
* count sync: the worker's refresh statements (one read of `MAX(number)` for 500 chats,
  one `UPDATE ... JOIN` raising their counts), 20 batches of random chats, with
  MariaDB's CPU per batch.

Idle after load: on an empty database, `--load-chats` chats (default 200,000) over 100
applications, then `--load-messages` messages (default 1,000,000) into random ones of
them, all through the API; from the end of the load, the time until the queue is
drained, every count in MySQL is right, and the worker and MariaDB together use under
5% of a core for a whole second.
"""

import datetime
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common
from common import http_ok, mariadb_argv, read_pid

HOT = 100  # messages in chat 1 of each application
TS = "2026-01-01 00:00:00.000000"
SMALL = (10_000, 1_000, 10)  # messages, chats, applications of the small data set


def token_of(app_id):
    return f"growth{app_id:010d}"


def shape(messages, chats, apps):
    """Chats per application, and the message count of each chat number."""
    per_app_chats = max(1, chats // apps)
    per_app = messages // apps
    if per_app_chats == 1:
        return 1, [per_app]
    hot = min(HOT, per_app)
    rest = per_app - hot
    base, extra = divmod(rest, per_app_chats - 1)
    return per_app_chats, [hot] + [base + (1 if i < extra else 0) for i in range(per_app_chats - 1)]


# ---- loading -------------------------------------------------------------------------

class Loader:
    def __init__(self, b):
        self.b = b
        self.dir = b.DATA / "load"
        self.dir.mkdir(parents=True, exist_ok=True)

    def mysql(self, sql, *extra):
        return self.b.run(mariadb_argv(self.b.MYSQL_PORT, "--local-infile=1", *extra, "chat_bench",
                                       "-e", sql))

    def load_data(self, table, columns, lines):
        """Streams `lines` (an iterator of text chunks) through a FIFO into one
        `LOAD DATA LOCAL INFILE`: the generator and MariaDB run side by side."""
        fifo = self.dir / f"{table}.fifo"
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo)
        sql = ("SET unique_checks = 0; SET foreign_key_checks = 0; "
               f"LOAD DATA LOCAL INFILE '{fifo}' INTO TABLE {table} ({', '.join(columns)})")
        proc = subprocess.Popen(mariadb_argv(self.b.MYSQL_PORT, "--local-infile=1", "chat_bench", "-e", sql),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with open(fifo, "w") as f:
                for chunk in lines:
                    f.write(chunk)
        finally:
            out, err = proc.communicate()
            fifo.unlink()
        if proc.returncode:
            raise SystemExit(f"bench: LOAD DATA into {table} failed: {err}")

    def load(self, first_app, apps, chats_per_app, sizes, chunk_apps=200):
        """Applications first_app .. first_app+apps-1, each with `chats_per_app` chats of
        `sizes` messages. One LOAD DATA per table per `chunk_apps`... applications
        (about a million messages at the default shape): one transaction each."""
        words = self.b.WORDS
        per_app = sum(sizes)
        step = max(1, min(chunk_apps, 1_000_000 // max(per_app, 1)))
        for lo in range(first_app, first_app + apps, step):
            hi = min(lo + step, first_app + apps)
            self.load_data("applications", ["id", "token", "name", "chats_count", "created_at", "updated_at"],
                           ["".join(f"{a}\t{token_of(a)}\tgrowth {a}\t{chats_per_app}\t{TS}\t{TS}\n"
                                    for a in range(lo, hi))])
            self.load_data("chats", ["application_id", "number", "title", "messages_count", "version",
                                     "created_at", "updated_at"],
                           ("".join(f"{a}\t{c}\tchat {c}\t{sizes[c - 1]}\t1\t{TS}\t{TS}\n"
                                    for c in range(1, chats_per_app + 1)) for a in range(lo, hi)))

            def messages():
                for a in range(lo, hi):
                    out = []
                    for c, size in enumerate(sizes, 1):
                        x = a * 7919 + c * 104729
                        for n in range(1, size + 1):
                            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
                            out.append(f"{a}\t{c}\t{n}\tmessage {n} {words[x % 1000]} {words[(x >> 10) % 1000]} "
                                       f"{words[(x >> 20) % 1000]} lorem ipsum\t1\t{TS}\t{TS}\n")
                    yield "".join(out)

            self.load_data("messages", ["application_id", "chat_number", "number", "body", "version",
                                        "created_at", "updated_at"], messages())

    def totals(self):
        out = self.mysql("SELECT (SELECT COUNT(*) FROM applications), (SELECT COUNT(*) FROM chats), "
                         "(SELECT COUNT(*) FROM messages)", "-N")
        return tuple(int(x) for x in out.split())


# ---- CPU of the processes ------------------------------------------------------------

def cpu_ticks(b, stack, parts=("worker", "mysql")):
    """CPU ticks so far of each part: the api process, the worker process(es), Redis, MariaDB."""
    return b.cpu_ticks(stack, parts)


def machine_load():
    """The 1-minute load average and the share of the machine's CPU time not idle over a
    second, taken before a phase: the machine is shared with other work."""
    def stat():
        f = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]
    t0, i0 = stat()
    time.sleep(1)
    t1, i1 = stat()
    return {"loadavg_1m": float(pathlib.Path("/proc/loadavg").read_text().split()[0]),
            "busy": 1 - (i1 - i0) / max(t1 - t0, 1)}


def queue_status(b, stack):
    return common.queue_status(b.BINARY, stack.env)


def drained(status):
    return (not status.get("index_gap")
            and all(g["pending"] == 0 and g["lag"] == 0 for g in status["groups"]))


# ---- the growth scenario -------------------------------------------------------------

def restart(b, stack):
    stack.start("worker", "worker", WORKER_METRICS_BIND=b.WORKER_METRICS)
    stack.start("api", "api", BIND=b.API)
    b.wait_until("the api", lambda: http_ok(b.API), 120)
    b.wait_until("the worker", lambda: http_ok(b.WORKER_METRICS), 120)


def reindex(b, stack):
    stack.stop("api")
    stack.stop("worker")
    start = time.time()
    subprocess.run([b.BINARY, "reindex"], env=stack.env, check=True, stdout=subprocess.DEVNULL,
                   stderr=open(b.DATA / "reindex.log", "w"))
    return time.time() - start


def count_sync_cost(b, loader, apps, chats_per_app, batches=20, per_batch=500):
    """MariaDB's CPU and the wall time for the worker's count-refresh statement pair
    (src/store/mysql.rs, `sync_counts`: the read of `MAX(number)` for each chat of a
    batch, then one `UPDATE ... JOIN` raising each count to what was read), on
    `batches` batches of `per_batch` random chats."""
    rng = random.Random(7)
    pairs = []
    for _ in range(batches):
        chats = [(rng.randint(1, apps), rng.randint(1, chats_per_app)) for _ in range(per_batch)]
        read = " UNION ALL ".join(
            f"SELECT (SELECT MAX(number) FROM messages WHERE application_id = {a} AND chat_number = {c})"
            for a, c in chats)
        maxima = loader.mysql(read, "-N").split()  # what the worker would have read
        write = ("UPDATE chats p JOIN (" + " UNION ALL ".join(
            f"SELECT {a} AS k0, {c} AS k1, {m} AS m" for (a, c), m in zip(chats, maxima) if m != "NULL")
            + ") v ON p.application_id = v.k0 AND p.number = v.k1 "
              "SET p.messages_count = GREATEST(p.messages_count, v.m)")
        pairs += [read, write]
    script = loader.dir / "count-sync.sql"
    script.write_text(";\n".join(pairs) + ";\n")
    pid = read_pid(b.DATA / "deps" / "mysql" / "mysqld.pid")
    before, start = b._ticks(f"/proc/{pid}/stat"), time.time()
    with open(script) as stdin:
        subprocess.run(mariadb_argv(b.MYSQL_PORT, "chat_bench"), stdin=stdin,
                       stdout=subprocess.DEVNULL, check=True)
    wall = time.time() - start
    cpu = (b._ticks(f"/proc/{pid}/stat") - before) / b.CLOCK_TICKS
    script.unlink()
    result = {"batches": batches, "per_batch": per_batch,
              "mysql_cpu_ms_per_batch": cpu * 1000 / batches, "wall_ms_per_batch": wall * 1000 / batches}
    b.log(f"count sync: {per_batch} chats per batch, MariaDB CPU {result['mysql_cpu_ms_per_batch']:.1f} ms, "
          f"wall {result['wall_ms_per_batch']:.1f} ms per batch (statement pair)")
    return result


def cpu_per_request(b, stack, name, lua, seconds, profile=None):
    """A saturated wrk run with the CPU each process spent per request. With
    BENCH_PERF=1 and a `profile` name, `perf record` samples the api, Redis and MariaDB
    meanwhile, and its summary by process and component (bench/perf_summary.py) goes to
    bench/results/profile-<name>.txt."""
    perf = None
    if profile and os.environ.get("BENCH_PERF") == "1":
        pids = [str(stack.procs["api"].pid)] + [str(read_pid(b.DATA / "deps" / d / f"{n}.pid"))
                                                for d, n in (("redis", "redis"), ("mysql", "mysqld"))]
        data = b.DATA / f"perf-{profile}.data"
        # System-wide, then only these processes (bench/perf_summary.py --pid): attached to
        # processes (-p), perf missed MariaDB's connection threads.
        perf = subprocess.Popen(["perf", "record", "-a", "-F", "499", "-e", "cpu-clock", "-o", str(data),
                                 "--", "sleep", str(seconds)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = cpu_ticks(b, stack, ("api", "worker", "redis", "mysql"))
    r = b.wrk(name, lua, seconds)
    after = cpu_ticks(b, stack, ("api", "worker", "redis", "mysql"))
    if perf:
        perf.wait()
        summary = subprocess.run([sys.executable, str(b.ROOT / "bench" / "perf_summary.py"), str(data),
                                  str(r["requests"]), ",".join(pids)], capture_output=True, text=True).stdout
        (common.RESULTS / f"profile-{profile}.txt").write_text(
            f"# perf record -a -F 499 -e cpu-clock during: {name}\n"
            f"# {r['requests']:,} requests in {seconds} s; python3 bench/perf_summary.py .data/bench/{data.name} "
            f"{r['requests']} <api pid>,<redis pid>,<mariadb pid>\n" + summary)
    r["cpu_us_per_request"] = {k: (after[k] - before.get(k, 0)) / b.CLOCK_TICKS * 1e6 / max(r["requests"], 1)
                               for k in after}
    b.log(f"{name}: CPU per request " + ", ".join(f"{k} {v:.0f} µs" for k, v in r["cpu_us_per_request"].items()))
    return r


# Requests/s of the paced reads, on both data sets: about a third of what the grown set
# takes saturated on the 2-core development machine, well under the small set's.
PACED = {"get message": 3000, "list page (50)": 1300, "search": 1300}


def scenarios(b, stack, label, apps, chats_per_app, sizes, d):
    """The scenarios on applications 1..apps; results keyed by scenario."""
    results = {"_machine": machine_load()}
    b.log(f"{label}: machine load {results['_machine']['loadavg_1m']:.2f}, busy {results['_machine']['busy']:.0%}")
    min_size = min(sizes)
    tok = 'string.format("growth%010d", math.random(' + str(apps) + '))'
    # The 1,000-chat set: spread evenly over the applications; one create each first.
    fixed = [(1 + (k * apps) // 1000, 1 + (k * 7) % chats_per_app) for k in range(1000)]
    for a, c in fixed:
        b.http("POST", f"/applications/{token_of(a)}/chats/{c}/messages", {"body": "warm"})
    paths = ",".join(f'"/applications/{token_of(a)}/chats/{c}/messages"' for a, c in fixed)
    b.wait_until("the queue to drain", lambda: drained(queue_status(b, stack)), 300, 0.5)
    lua = f"local P = {{{paths}}}\n" + b.lua_post("P[math.random(#P)]", b.body_expr())
    results["create message, 1,000 chats"] = cpu_per_request(b, stack, f"{label}: create message, 1,000 chats", lua, d)
    b.wait_until("the queue to drain", lambda: drained(queue_status(b, stack)), 600, 0.5)
    results["create message, random chat"] = b.wrk(
        f"{label}: create message, random chat",
        b.lua_post(f'"/applications/" .. {tok} .. "/chats/" .. math.random({chats_per_app}) .. "/messages"',
                   b.body_expr()), d)
    b.wait_until("the queue to drain", lambda: drained(queue_status(b, stack)), 600, 0.5)
    get = f'"/applications/" .. {tok} .. "/chats/" .. math.random({chats_per_app}) .. "/messages/" .. math.random({min_size})'
    results["get message"] = cpu_per_request(b, stack, f"{label}: get message", b.lua_get(get), d,
                                            profile=f"get-message-{label}")
    conns = 16
    delay = max(1, round(conns * 1000 / PACED["get message"]))
    results["get message, paced"] = b.wrk(f"{label}: get message at ~{conns * 1000 / delay:,.0f}/s",
                                          b.lua_get(get, delay), d, connections=conns)
    page = f'"/applications/" .. {tok} .. "/chats/1/messages?limit=50&after=" .. math.random(0, {sizes[0] - 50})'
    peak, paced = b.read_scenario(f"{label}: list page (50)", page, d, PACED["list page (50)"])
    results["list page (50)"], results["list page (50), paced"] = peak, paced
    words = ",".join(f'"{w}"' for w in b.WORDS)
    search = (f'(function() local W = {{{words}}} return "/applications/" .. {tok} .. '
              f'"/chats/1/messages/search?q=" .. W[math.random(#W)] end)()')
    peak, paced = b.read_scenario(f"{label}: search", search, d, PACED["search"])
    results["search"], results["search, paced"] = peak, paced
    return results


def growth(b, stack, args):
    d = 4 if args.quick else 10
    loader = Loader(b)
    stack.stop("api")
    stack.stop("worker")
    figures = {"machine": machine()}

    s_msgs, s_chats, s_apps = SMALL
    s_cpa, s_sizes = shape(s_msgs, s_chats, s_apps)
    t = time.time()
    loader.load(1, s_apps, s_cpa, s_sizes)
    figures["small_load_s"] = time.time() - t
    figures["small_totals"] = loader.totals()
    figures["small_reindex_s"] = reindex(b, stack)
    restart(b, stack)
    small = scenarios(b, stack, "small", s_apps, s_cpa, s_sizes, d)
    small["count sync"] = count_sync_cost(b, loader, s_apps, s_cpa)

    g_cpa, g_sizes = shape(args.growth_messages, args.growth_chats, args.growth_apps)
    if g_cpa != s_cpa or g_sizes != s_sizes:
        b.log(f"note: the grown set's shape ({g_cpa} chats per application) differs from the small one's")
    stack.stop("api")
    stack.stop("worker")
    figures["grow_machine"] = machine_load()
    t = time.time()
    loader.load(s_apps + 1, args.growth_apps - s_apps, g_cpa, g_sizes)
    figures["grow_load_s"] = time.time() - t
    figures["grown_totals"] = loader.totals()
    b.log(f"grown to {figures['grown_totals'][0]:,} applications, {figures['grown_totals'][1]:,} chats, "
          f"{figures['grown_totals'][2]:,} messages in {figures['grow_load_s']:.0f} s")
    figures["grown_reindex_s"] = reindex(b, stack)
    b.log(f"reindexed {figures['grown_totals'][2]:,} messages in {figures['grown_reindex_s']:.0f} s")
    figures["data_mib"] = data_mib(loader)
    restart(b, stack)
    grown = scenarios(b, stack, "grown", args.growth_apps, g_cpa, g_sizes, d)
    grown["count sync"] = count_sync_cost(b, loader, args.growth_apps, g_cpa)
    write_growth(b, args, figures, small, grown)


def data_mib(loader):
    out = loader.mysql("SELECT table_name, ROUND((data_length + index_length) / 1048576) FROM "
                       "information_schema.tables WHERE table_schema = 'chat_bench'", "-N")
    sizes = dict(line.split("\t") for line in out.strip().splitlines())
    index = sum(f.stat().st_size for f in (loader.b.DATA / "search").rglob("*") if f.is_file()) / 1048576
    sizes["search index"] = f"{index:.0f}"
    return sizes


def machine():
    return common.machine_summary()


def write_growth(b, args, f, small, grown):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    st, gt = f["small_totals"], f["grown_totals"]
    cmd = ("scripts/bench --growth" + (" --quick" if args.quick else "")
           + f" --growth-messages {args.growth_messages} --growth-chats {args.growth_chats} --growth-apps {args.growth_apps}")
    lines = [f"# Growth benchmark — {stamp}", "",
             f"Machine: {f['machine']}, shared with other work during the run (load average and the share "
             "of the machine's CPU busy in the second before each phase are given below). "
             f"Worker priority: {b.WORKER_PRIORITY}.", "",
             f"* small: {st[0]:,} applications, {st[1]:,} chats, {st[2]:,} messages "
             f"(loaded in {f['small_load_s']:.1f} s, indexed by `chat-system reindex` in {f['small_reindex_s']:.1f} s); "
             f"machine load {small['_machine']['loadavg_1m']:.2f}, {small['_machine']['busy']:.0%} busy",
             f"* grown: {gt[0]:,} applications, {gt[1]:,} chats, {gt[2]:,} messages "
             f"(bulk-loaded in {f['grow_load_s']:.0f} s, "
             f"{(gt[2] - st[2]) / max(f['grow_load_s'], 1e-9):,.0f} messages/s; indexed in {f['grown_reindex_s']:.0f} s, "
             f"{gt[2] / max(f['grown_reindex_s'], 1e-9):,.0f} messages/s); "
             f"machine load {grown['_machine']['loadavg_1m']:.2f}, {grown['_machine']['busy']:.0%} busy",
             "* on disk, grown: " + ", ".join(f"{k} {v} MiB" for k, v in f.get("data_mib", {}).items()), "",
             "| scenario | small: req/s | grown: req/s | grown / small | small: p99 ms | grown: p99 ms | grown / small | errors, non-2xx: small; grown |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, s in small.items():
        if key.startswith("_") or key == "count sync":
            continue
        g = grown[key]
        lines.append(f"| {key} | {s['rps']:,.0f} | {g['rps']:,.0f} | {g['rps'] / s['rps']:.2f} | "
                     f"{s['p99_ms']:.2f} | {g['p99_ms']:.2f} | {g['p99_ms'] / max(s['p99_ms'], 1e-9):.2f} | "
                     f"{s['errors']}, {s['non2xx']}; {g['errors']}, {g['non2xx']} |")
    sc, gc = small["count sync"], grown["count sync"]
    lines += ["", "| count sync, one statement pair for 500 random chats | small | grown | grown / small |",
              "|---|---:|---:|---:|",
              f"| MariaDB CPU per batch | {sc['mysql_cpu_ms_per_batch']:.1f} ms | {gc['mysql_cpu_ms_per_batch']:.1f} ms | "
              f"{gc['mysql_cpu_ms_per_batch'] / max(sc['mysql_cpu_ms_per_batch'], 1e-9):.2f} |",
              f"| wall time per batch | {sc['wall_ms_per_batch']:.1f} ms | {gc['wall_ms_per_batch']:.1f} ms | "
              f"{gc['wall_ms_per_batch'] / max(sc['wall_ms_per_batch'], 1e-9):.2f} |", "",
              "CPU per request (µs, from /proc; saturated runs):", "",
              "| scenario | data | api | worker | Redis | MariaDB |", "|---|---|---:|---:|---:|---:|"]
    for key in ("create message, 1,000 chats", "get message"):
        for label, res in (("small", small), ("grown", grown)):
            c = res[key].get("cpu_us_per_request", {})
            lines.append(f"| {key} | {label} | " + " | ".join(f"{c.get(p, 0):.0f}" for p in ("api", "worker", "redis", "mysql")) + " |")
    lines += ["", f"Reproduce: `{cmd}`.", ""]
    text = "\n".join(lines)
    out = common.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "growth.md").write_text(text)
    (out / "growth.json").write_text(json.dumps({"figures": f, "small": small, "grown": grown}, indent=1, default=str))
    print(text)


# ---- idle after load -----------------------------------------------------------------

def idle_after_load(b, stack, args):
    apps = 100
    tokens = [b.http("POST", "/applications", {"name": f"load {i}"})["token"] for i in range(apps)]
    toks = ",".join(f'"{t}"' for t in tokens)
    load = machine_load()
    b.log(f"idle after load: machine load {load['loadavg_1m']:.2f}, {load['busy']:.0%} busy")

    start = time.time()
    chats, _ = wrk_capped(b, f"load: {args.load_chats:,} chats over {apps} applications", toks, args.load_chats,
                          b.lua_post('"/applications/" .. T[n % #T + 1] .. "/chats"', "'{\"title\":\"t\"}'"))
    per_app = args.load_chats // apps - 10 if args.load_chats >= apps * 20 else max(1, args.load_chats // apps // 2)
    msgs, load_end = wrk_capped(
        b, f"load: {args.load_messages:,} messages into chats 1..{per_app} of each application", toks,
        args.load_messages,
        b.lua_post(f'"/applications/" .. T[math.random(#T)] .. "/chats/" .. math.random({per_app}) .. "/messages"',
                   b.body_expr()))
    created_chats = chats["requests"] - chats["non2xx"]
    created_msgs = msgs["requests"] - msgs["non2xx"]
    samples, marks = [], {}
    before = cpu_ticks(b, stack)
    prev_t, prev = load_end, before
    quiet_since = None
    loader = Loader(b)
    last_log, rows = 0, None
    while time.time() - load_end < args.idle_limit:
        time.sleep(0.25)
        now, ticks = time.time(), cpu_ticks(b, stack)
        by_part = {k: (ticks[k] - prev.get(k, 0)) / b.CLOCK_TICKS / max(now - prev_t, 1e-9) for k in ticks}
        cores = sum(by_part.values())
        status = queue_status(b, stack)
        samples.append({"t": now - load_end, "cores": cores, **{f"cores_{k}": v for k, v in by_part.items()},
                        "queue": sum(g["pending"] + g["lag"] for g in status["groups"])})
        if now - last_log >= 5:
            last_log = now
            b.log(f"+{now - load_end:.0f} s: " + ", ".join(f"{k} {v:.2f} cores" for k, v in by_part.items())
                  + f", queue {samples[-1]['queue']:,}, reached: {', '.join(marks) or 'nothing yet'}")
        prev_t, prev = now, ticks
        persist = next((g for g in status["groups"] if g["name"] == "persist"), {"pending": 0, "lag": 0})
        if "persisted" not in marks and persist["pending"] == 0 and persist["lag"] == 0:
            marks["persisted"] = now - load_end
        if "drained" not in marks and drained(status):
            marks["drained"] = now - load_end
        if "drained" in marks and rows is None:
            # Everything accepted is persisted now: the rows are what the counts must reach
            # (wrk does not count the answers to the requests in flight when it stopped).
            rows = [int(x) for x in loader.mysql("SELECT (SELECT COUNT(*) FROM chats), "
                                                 "(SELECT COUNT(*) FROM messages)", "-N").split()]
            created_chats, created_msgs = rows
        if "drained" in marks and "counts" not in marks and int(now * 2) % 2 == 0:
            got = loader.mysql("SELECT (SELECT SUM(chats_count) FROM applications), "
                               "(SELECT SUM(messages_count) FROM chats)", "-N").split()
            counts = [int(x) if x != "NULL" else 0 for x in got]
            if counts == rows:
                marks["counts"] = time.time() - load_end
            elif now - last_log < 0.3:
                b.log(f"counts in MySQL {counts}, created {[created_chats, created_msgs]}")
        quiet_since = (quiet_since or now) if cores < 0.05 else None
        if "counts" in marks and quiet_since and now - quiet_since >= 1.0:
            marks["idle"] = quiet_since - load_end
            break
    text = write_idle(b, args, load, chats, msgs, created_chats, created_msgs, marks, samples, time.time() - start)
    print(text)


def wrk_capped(b, name, toks, total, request_lua):
    """wrk (2 threads, 64 connections) until `total` answers: each thread stops sending
    after its half and leaves a mark file; wrk, whose main thread sleeps out its duration
    whatever its threads do, is then interrupted and prints its summary. Returns the
    figures and the time the last thread finished."""
    marks = pathlib.Path(tempfile.mkdtemp(dir=b.DATA))
    lua = (f"local T = {{{toks}}}\nlocal quota = {total // 2}\nlocal answered = 0\n" + request_lua
           + "\nresponse = function() answered = answered + 1\n"
             "  if answered == quota then\n"
             f"    local f = io.open('{marks}/' .. tostring({{}}):sub(8), 'w') f:close() wrk.thread:stop()\n"
             "  end\nend\n" + b.WRK_DONE)
    script = marks / "load.lua"
    script.write_text(lua)
    proc = subprocess.Popen(["wrk", "-t", "2", "-c", "64", "-d", "3600s", "--timeout", "5s", "-s", str(script),
                             f"http://{b.API}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while len([p for p in marks.iterdir() if p.name != "load.lua"]) < 2 and proc.poll() is None:
        time.sleep(0.02)
    finished = time.time()
    proc.send_signal(2)  # SIGINT: wrk stops and reports
    out, err = proc.communicate()
    shutil.rmtree(marks)
    result = common.wrk_figures(name, out, err)
    b.log(f"{name}: {result['requests']:,} answers at {result['rps']:,.0f}/s, p99 {result['p99_ms']:.2f} ms, "
          f"errors {result['errors']}, non-2xx {result['non2xx']}")
    return result, finished


def write_idle(b, args, load, chats, msgs, created_chats, created_msgs, marks, samples, total_s):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def fmt(k):
        return f"{marks[k]:.1f} s" if k in marks else f"not within {args.idle_limit} s"

    lines = [f"# Idle after load — {stamp}", "",
             f"Machine: {machine()}, shared with other "
             f"work (load average {load['loadavg_1m']:.2f} and {load['busy']:.0%} of the CPU busy just before "
             f"the load). Worker priority: {b.WORKER_PRIORITY}; count sync every 10 s.", "",
             f"Load through the API (wrk, 64 connections): {created_chats:,} chats at {chats['rps']:,.0f}/s, then "
             f"{created_msgs:,} messages at {msgs['rps']:,.0f}/s (rows in MySQL once persisted; wrk stops at its "
             f"quota and leaves the answers in flight uncounted; errors {chats['errors'] + msgs['errors']}, "
             f"non-2xx {chats['non2xx'] + msgs['non2xx']}).", "",
             "| from the end of the load until | time |", "|---|---:|",
             f"| the persist group has nothing pending | {fmt('persisted')} |",
             f"| every group has nothing pending (persisted and indexed) | {fmt('drained')} |",
             f"| every count in MySQL is right (sums of chats_count and messages_count = rows) | {fmt('counts')} |",
             f"| **idle**: all that, and worker + MariaDB under 5% of a core for 1 s | **{fmt('idle')}** |", "",
             "CPU of the worker and MariaDB together (cores) and the queue, each second after the load:", "",
             "| s | cores | queue (pending + lag, all groups) |", "|---:|---:|---:|"]
    for s in range(0, int(samples[-1]["t"]) + 1 if samples else 0):
        xs = [x for x in samples if s <= x["t"] < s + 1]
        if xs:
            lines.append(f"| {s} | {sum(x['cores'] for x in xs) / len(xs):.2f} | {xs[-1]['queue']:,} |")
    lines += ["", f"Reproduce: `scripts/bench --idle-after-load --load-chats {args.load_chats} "
                  f"--load-messages {args.load_messages}`.", ""]
    text = "\n".join(lines)
    out = common.RESULTS
    (out / "idle-after-load.md").write_text(text)
    (out / "idle-after-load.json").write_text(json.dumps(
        {"machine": load, "chats": chats, "messages": msgs, "marks": marks, "samples": samples}, indent=1))
    return text
