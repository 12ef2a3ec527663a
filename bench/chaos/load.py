"""The chaos run's clients: the steady create load with its probe reads, the search for
accepted messages, and the connection flood."""

import http.client
import json
import random
import selectors
import socket
import threading
import time
import urllib.parse

from .base import APIS, CLIENT_TIMEOUT, PROBLEM_TYPE, now


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


def parse_created(status, raw):
    """(number, answer document, detail) of a create's answer: a 201's number and body,
    or the start of an error answer (or of a 201 body that cannot be read) in detail."""
    if status != 201:
        return None, None, raw[:200].decode(errors="replace")
    try:
        doc = json.loads(raw)
        return int(doc["number"]), doc, ""
    except (ValueError, KeyError, TypeError) as e:
        return None, None, f"bad 201 body: {e}: {raw[:200]!r}"


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
        number, doc, detail = parse_created(status, raw)
        if doc is not None and doc.get("title") != title:
            detail = f"answered title {doc.get('title')!r}"
        if number is not None:
            self.chats.append((token, number))
        self.records.append(Rec("chat", api, t0, t1, status, token, None, number, title, detail,
                                client.retry_after))
        return number

    def create_message(self, client, api, token, chat):
        body = f"chaos-{self.run}-{self.next_seq():07d}"
        t0 = now()
        status, raw = client.request(
            "POST", f"/applications/{token}/chats/{chat}/messages", {"body": body})
        t1 = now()
        number, doc, detail = parse_created(status, raw)
        if doc is not None and (doc.get("body") != body or doc.get("chat_number") != chat):
            detail = f"answered {doc!r}"
        if number is not None:
            self.last_message = (api, token, chat, number)
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

    def probe_target(self, i):
        """(kind, path, token, chat, number) of the i-th probe read: an application and a
        recent message in turn."""
        if i % 2 == 0 or self.last_message is None:
            token = self.apps[i % len(self.apps)]
            return "get-app", f"/applications/{token}", token, None, None
        _, token, chat, number = self.last_message
        return ("get-message", f"/applications/{token}/chats/{chat}/messages/{number}",
                token, chat, number)

    def probe(self):
        """Reads at a low rate: an application (MySQL) and a recent message (a pending
        record in Redis, or MySQL once persisted)."""
        clients = [Client(a) for a in APIS]
        i = 0
        try:
            while not self.stop.wait(0.1):
                i += 1
                api = i % len(APIS)
                kind, path, token, chat, number = self.probe_target(i)
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


def accepted_messages(load, a, b):
    return [r for r in list(load.records) if r.kind == "message" and r.status == 201
            and r.number is not None and a <= r.t0 <= b]


def search_once(client, r, wrong):
    """Whether a search finds the record's text (a wrong answer is added to `wrong`)."""
    q = urllib.parse.quote(r.text.split("-", 1)[1])  # "<run>-<seq>", unique
    status, raw = client.request(
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
    return found


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
            if not search_once(clients[i % 2], r, wrong):
                still.append(r)
        pending = still
        if pending:
            time.sleep(0.5)
    for c in clients:
        c.close()
    return pending, wrong, (time.monotonic() - start) if not pending else None


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

    def read_closed(self):
        """Connections the server closed (or answered) since the last call, replaced."""
        for key, _ in self.sel.select(timeout=0.01 if self.to_open else 0.1):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            self.server_closed(s, data)

    def trickle(self, t):
        """The next byte of the head on each slow connection that is due one."""
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

    def close_rest(self):
        t = now()
        for s, (opened_at, _, _, _) in list(self.open.items()):
            self.left_open.append(t - opened_at)
            self.sel.unregister(s)
            s.close()
        self.open.clear()
        self.sel.close()

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
            self.read_closed()
            t = now()
            if t < next_pass:
                continue
            next_pass = t + 0.25
            self.trickle(t)
        self.stop.set()
        self.close_rest()
