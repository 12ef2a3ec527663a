"""Helpers shared by the benchmark and chaos drivers under bench/ (standard library only):
the repository's paths, the release build, scripts/deps, the MariaDB and Redis command-line
clients, HTTP on loopback, the product's own `create-script` and `queue-status` commands,
Redis Cluster slot ownership, child processes and wrk's summary line."""

import http.client
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def make_log(prefix):
    """A `log(msg)` that writes `prefix: msg` to standard error."""
    def log(msg):
        print(f"{prefix}: {msg}", file=sys.stderr, flush=True)
    return log


def machine_summary():
    """`N cores, M GiB` of this machine."""
    out = subprocess.run(["sh", "-c", "nproc; free -g | awk '/Mem/{print $2}'"],
                         capture_output=True, text=True, check=True).stdout
    return out.replace("\n", " cores, ", 1).strip() + " GiB"


# ---- the build ----------------------------------------------------------------------

def target_dir():
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def build_release(*examples):
    """`cargo build --release` of the chat-system binary (and of `examples`); returns the
    target directory's release folder."""
    extra = [arg for name in examples for arg in ("--example", name)]
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "chat-system", *extra],
                   cwd=ROOT, check=True)
    return target_dir() / "release"


# ---- scripts/deps -------------------------------------------------------------------

def deps_env(deps_dir, mysql_port, redis_port, **extra):
    """The environment of scripts/deps for a private MariaDB and Redis; an `extra` value
    of None removes that variable."""
    env = dict(os.environ, DEPS_DIR=str(deps_dir), DEPS_MYSQL_PORT=str(mysql_port),
               DEPS_REDIS_PORT=str(redis_port))
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def deps(action, env, check=True, quiet=True, **kw):
    """scripts/deps start|stop with that environment (its output dropped if `quiet`)."""
    subprocess.run([str(ROOT / "scripts" / "deps"), action], env=env, check=check,
                   stdout=subprocess.DEVNULL if quiet else None, **kw)


# ---- MariaDB and Redis clients ------------------------------------------------------

def mariadb_argv(port, *extra):
    """The `mariadb` client's command line for root on 127.0.0.1:port."""
    return ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uroot", *extra]


def redis_cli(port, *args, timeout=None):
    """redis-cli's output for one command (raw, as when not on a terminal); a failure
    raises RuntimeError with its error output."""
    out = subprocess.run(["redis-cli", "-p", str(port), "--raw", *map(str, args)],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli: {out.stderr.strip()}")
    return out.stdout


def cluster_slot_ranges(port):
    """[(first slot, last slot, port)] of the masters, from CLUSTER NODES asked of one node."""
    ranges = []
    for line in redis_cli(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) < 9 or "master" not in fields[2]:
            continue
        node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for r in fields[8:]:
            if r.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = r.partition("-")
            ranges.append((int(lo), int(hi or lo), node_port))
    return ranges


def slot_owner(ranges, slot):
    """The port of the master serving `slot`; LookupError if none does."""
    for lo, hi, port in ranges:
        if lo <= slot <= hi:
            return port
    raise LookupError(f"no master serves slot {slot}")


# ---- the product's own commands -----------------------------------------------------

def create_script(binary, env, token, chat=None, body=None):
    """`chat-system create-script`: the create script with its KEYS, ARGV, seed commands
    and slot for one create (key names are never written by the drivers)."""
    args = [str(binary), "create-script", "--token", token]
    if chat is not None:
        args += ["--chat", str(chat)]
    if body is not None:
        args += ["--body", body]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def queue_status(binary, env, tokens=()):
    """`chat-system queue-status` as a dict (per shard and totals; counters of `tokens`);
    a failure raises RuntimeError."""
    args = [str(binary), "queue-status"]
    # `=`: a token may start with `-`, which would read as an option.
    args += [f"--counters-of={token}" for token in tokens]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"queue-status: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


# ---- HTTP on loopback ---------------------------------------------------------------

def http_get(addr, path, timeout=2.0):
    """(status, body) of a GET to host:port, on a connection of its own."""
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_ok(addr, path="/healthz", timeout=1.0):
    """Whether a GET answers 200 (False if it fails in any way)."""
    try:
        return http_get(addr, path, timeout=timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def http_json(method, url, body=None, timeout=10):
    """A request with an optional JSON body; the answer's JSON, or its raw bytes when it
    is not JSON. An HTTP error status raises urllib.error.HTTPError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
        return json.loads(text) if text and r.headers.get_content_type().endswith("json") else text


def metrics_text(addr, timeout=5.0):
    """The text of a /metrics page; OSError if it cannot be had (or is not a 200)."""
    status, raw = http_get(addr, "/metrics", timeout=timeout)
    if status != 200:
        raise OSError(f"GET http://{addr}/metrics answered {status}")
    return raw.decode(errors="replace")


# ---- processes ----------------------------------------------------------------------

def read_pid(path):
    """The process id in a pid file, or None."""
    try:
        return int(pathlib.Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def stop_process(popen, grace, cont=False, on_kill=None):
    """SIGTERM (and SIGCONT, if `cont`, for a process left frozen), then SIGKILL after
    `grace` seconds; `on_kill()` is called before the SIGKILL."""
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    if cont:
        popen.send_signal(signal.SIGCONT)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        if on_kill:
            on_kill()
        popen.kill()
        popen.wait(timeout=10)


def stop_processes(popens, grace):
    """SIGTERM to every process at once, then each one waited for `grace` seconds and
    killed if still running."""
    for popen in popens:
        if popen.poll() is None:
            popen.terminate()
    for popen in popens:
        stop_process(popen, grace)


# ---- wrk ----------------------------------------------------------------------------

def wrk_figures(name, stdout, stderr, prefix="bench"):
    """The figures of a wrk run from the `WRKJSON {...}` line its `done` hook (run.py's
    WRK_DONE) writes to standard error."""
    m = re.search(r"WRKJSON (\{.*\})", stderr)
    if not m:
        raise SystemExit(f"{prefix}: wrk failed for {name}:\n{stdout}\n{stderr}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    return {
        "scenario": name,
        "rps": r["requests"] / secs,
        "requests": r["requests"],
        "p50_ms": r["p50"] / 1000, "p99_ms": r["p99"] / 1000, "p999_ms": r["p999"] / 1000,
        "errors": r["connect"] + r["read"] + r["write"] + r["timeout"],
        "non2xx": r["status"],
    }
