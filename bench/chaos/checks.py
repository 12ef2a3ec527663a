"""The chaos run's verdict on the data and the requests: (1) every 201 persisted exactly
once, (2) numbers gap-free and agreeing with the Redis counters, (3) counts converge,
(4) search catches up, (5) failures were fast 503s during dependency outages; and the
processes' own exits and logs."""

import random
import time

from .base import ANSI, CLIENT_TIMEOUT, FAST, GRACE, log
from .load import search_for
from .stack import queue_status, sql


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


def in_list(tokens):
    return ",".join(f"'{t}'" for t in tokens)


# ---- the queue drains ---------------------------------------------------------------------

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


# ---- (1) and (2): persisted exactly once, numbers gap-free --------------------------------

def accepted_by_key(v, load):
    """{(token, number): title} and {(token, chat, number): body} of the 201s; the same
    number answered twice, or a 201 that does not echo what was sent, is a violation."""
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
    return chats_201, msgs_201


def stored_rows(tokens):
    """The same two tables as stored in MySQL."""
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
    return chat_rows, msg_rows


def compare_rows(v, load, what, accepted, rows, failed_texts):
    """(1) for one table: lost, altered, duplicated and phantom rows."""
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


def missing_numbers(numbers):
    """The numbers missing from 1 to the highest one; None when the numbers are exactly
    1 to the highest."""
    full = set(range(1, max(numbers) + 1))
    return sorted(full - numbers) if numbers != full else None


def check_numbering(v, chat_rows, msg_rows):
    """(2) gap-free numbering per parent in MySQL; returns the numbers per parent."""
    chats_of = {}
    for token, number in chat_rows:
        chats_of.setdefault(token, set()).add(number)
    msgs_of = {}
    for token, chat, number in msg_rows:
        msgs_of.setdefault((token, chat), set()).add(number)
    gaps = []
    for token, numbers in chats_of.items():
        missing = missing_numbers(numbers)
        if missing is not None:
            gaps.append(f"app {token[:8]}… chats missing {missing[:10]}")
    for (token, chat), numbers in msgs_of.items():
        missing = missing_numbers(numbers)
        if missing is not None:
            gaps.append(f"app {token[:8]}… chat {chat} messages missing {missing[:10]}")
    if gaps:
        v.fail(2, "numbers with gaps in MySQL", gaps)
    orphans = [f"{k}" for k in msgs_of if k not in chat_rows]
    if orphans:
        v.fail(2, "messages persisted in chats that have no row", orphans)
    return chats_of, msgs_of


def check_counters(v, tokens, chat_rows, chats_of, msgs_of):
    """(2) the Redis counters agree with the highest persisted number of each parent."""
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


def check_persistence(v, load, tokens):
    """(1) every 201 is exactly one row with its number and text; (2) numbers are
    unique and gap-free per parent, and the Redis counters agree with them."""
    chats_201, msgs_201 = accepted_by_key(v, load)
    chat_rows, msg_rows = stored_rows(tokens)
    failed_texts = {r.text for r in load.records
                    if r.kind in ("chat", "message") and r.status != 201}
    for what, accepted, rows in (("chat", chats_201, chat_rows), ("message", msgs_201, msg_rows)):
        compare_rows(v, load, what, accepted, rows, failed_texts)
    chats_of, msgs_of = check_numbering(v, chat_rows, msg_rows)
    check_counters(v, tokens, chat_rows, chats_of, msgs_of)
    return chats_201, msgs_201, chat_rows, msg_rows


# ---- (3) counts, (4) search ---------------------------------------------------------------

def counts_off(tokens):
    """Stored counts that differ from the real ones."""
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
    return off


def check_counts(v, tokens, limit):
    """(3) the stored counts reach the real counts within the deadline."""
    deadline = time.monotonic() + limit
    start = time.monotonic()
    while True:
        off = counts_off(tokens)
        if not off:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            v.fail(3, f"{len(off)} counts still differ from the real counts after {limit:.0f} s",
                   off)
            return None
        time.sleep(0.5)


def search_sample(accepted, faults, sample_size):
    """A third of the sample from the times the index-holding worker was down (killed), a
    third from the search outage (frozen), the rest from any time: (sample, killed, frozen)."""
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
    return everything, len(sample[0]), len(sample[1])


def check_search(v, load, faults, sample_size, limit):
    """(4) a sample of accepted messages is found again by search, within the deadline.
    A third of the sample comes from the times the index-holding worker was down (killed),
    a third from the search outage (frozen), the rest from any time."""
    accepted = [r for r in load.records if r.kind == "message" and r.status == 201
                and r.number is not None]
    if not accepted:
        v.fail(4, "no accepted message to search for")
        return 0, 0, 0, None
    everything, killed, frozen = search_sample(accepted, faults, sample_size)
    pending, wrong, seconds = search_for(everything, limit)
    if wrong:
        v.fail(4, "search answers with wrong content", wrong)
    if pending:
        v.fail(4, f"{len(pending)} of {len(everything)} sampled messages not found by search "
                  f"within {limit:.0f} s",
               [f"{r.text!r} (chat {r.chat} #{r.number}, created at {r.t0:.1f}s)" for r in pending])
    return len(everything), killed, frozen, seconds


# ---- (5) failures -------------------------------------------------------------------------

def dependency_windows(faults):
    return [(f.dependency, f.t_begin - 0.2, f.t_end + GRACE) for f in faults if f.dependency]


def classify_failures(load, faults):
    """The failed requests by kind of failure: hangs, 5xx other than 503, slow 503s,
    503s outside any dependency outage, other errors."""
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
    return hangs, five_hundreds, slow_503, stray_503, other


def fault_outcomes(v, load, f):
    """Creates and reads overlapping one fault: (fault, creates, 201s, 503s, reads, read
    503s); with MariaDB down, message creates must still succeed."""
    a, b = (f.t_begin - 0.2, f.t_end + GRACE) if f.dependency else (f.t_begin, f.t_end)
    creates = [r for r in load.records if r.kind in ("chat", "message")
               and r.t0 <= b and a <= r.t1]
    ok = sum(1 for r in creates if r.status == 201)
    n503 = sum(1 for r in creates if r.status == 503)
    reads = [r for r in load.records if r.kind.startswith("get-") and r.t0 <= b and a <= r.t1]
    reads_503 = sum(1 for r in reads if r.status == 503)
    if f.dependency == "mysql":
        check_mysql_down(v, load, f)
    return f, len(creates), ok, n503, len(reads), reads_503


def check_mysql_down(v, load, f):
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


def check_failures(v, load, faults):
    """(5) every failed request is a fast 503 during a dependency outage; creates keep
    working with MariaDB down."""
    hangs, five_hundreds, slow_503, stray_503, other = map(
        lambda rs: grouped(rs, faults), classify_failures(load, faults))
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
    return [fault_outcomes(v, load, f) for f in faults]


# ---- the processes ------------------------------------------------------------------------

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
