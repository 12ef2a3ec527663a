"""The chaos run's verdict on single faults: (6) the connection flood, (7) Redis at
maxmemory, (8) the search outage, (9) a cluster master killed. Each check also leaves
the fault's figures for the summary in `fault.figures`."""

import statistics

from .base import (CLAIM_IDLE, DATABASE_IDLE_TIMEOUT, GRACE, HEADER_READ_TIMEOUT, INDEX_LAG_MAX, mib,
                   percentile)
from .checks import grouped
from .load import Flood


# ---- (6) the connection flood -------------------------------------------------------------

def check_flood_held(v, fault):
    """The driver held the flood; the server closed its connections after
    HEADER_READ_TIMEOUT (not much before, never much after). Returns the gauge's peak."""
    flood = fault.flood
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
    return gauge_peak


def flood_figures(fault, gauge_peak, p99, worst, failed):
    flood, probes, connects = fault.flood, fault.probes, fault.connects
    ages = sorted(age for _, age, _ in flood.closed_by_server)
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
    return [
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


def check_flood(v, fault):
    """(6) during the flood a normal client is served within 1 s, never with a 5xx; the
    flood was held; the server closed its connections after HEADER_READ_TIMEOUT."""
    probes = fault.probes
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
    gauge_peak = check_flood_held(v, fault)
    fault.figures = flood_figures(fault, gauge_peak, p99, worst, failed)
    return p99, worst


# ---- (7) Redis at maxmemory ---------------------------------------------------------------

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


# ---- (8) the search outage ----------------------------------------------------------------

def check_memory_trend(v, fault, span):
    """A long outage must not let memory creep up: the median of its last minute against
    the median of its second minute (the first holds the climb to INDEX_LAG_MAX)."""
    if span < 180:
        return
    second = [u for t, u, _ in fault.samples if 60 <= t - fault.down_from < 120]
    last = [u for t, u, _ in fault.samples if t - fault.down_from >= span - 60]
    if second and last:
        m2, ml = statistics.median(second), statistics.median(last)
        fault.trend = (m2, ml)
        if ml > m2 * 1.25 and ml - m2 > 8 * 1048576:
            v.fail(8, f"Redis memory grew during the search outage: median {mib(m2)} in "
                      f"its second minute, {mib(ml)} in its last")


def check_outage_recovery(v, fault):
    """After SIGCONT the outage's messages are searchable, and the indexer caught up
    from MySQL."""
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


def outage_figures(fault, creates, ok, peak_used, peak_len, bound):
    return [
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


def check_search_outage(v, load, fault):
    """(8) with the indexer frozen, creates go on, the stream (and so Redis memory) stays
    bounded because it is trimmed past the indexer, and after it resumes every message of
    the outage is searchable (a sample, its first and last ones included)."""
    span = max(1e-3, fault.down_to - fault.down_from)
    creates = [r for r in load.records if r.kind in ("chat", "message")
               and fault.down_from <= r.t0 <= fault.down_to]
    ok = sum(1 for r in creates if r.status == 201)
    # Entries stay in the stream until they are older than INDEX_LAG_MAX (plus a trim
    # period, and a frozen consumer's entries until they are claimed; those its open
    # transaction holds, until MySQL rolls it back): allow twice that.
    held = max(INDEX_LAG_MAX, DATABASE_IDLE_TIMEOUT) + CLAIM_IDLE + 1.0
    bound = int(ok / span * 2 * held) + 100
    peak_used = max(fault.samples, key=lambda s: s[1], default=(0, 0, 0))
    peak_len = max(fault.samples, key=lambda s: s[2], default=(0, 0, 0))
    if not ok:
        v.fail(8, f"no create succeeded during the search outage ({len(creates)} tried)")
    if not fault.samples:
        v.fail(8, "Redis could not be sampled during the search outage")
    elif peak_len[2] > bound:
        v.fail(8, f"the stream reached {peak_len[2]} entries during the search outage "
                  f"(bound {bound}: {2 * held:.0f} s of creates; "
                  f"{ok} creates in {span:.0f} s)")
    if fault.trimmed_past <= 0:
        v.fail(8, "the stream was never trimmed past the frozen indexer "
                  "(index_trimmed_past_total of the other worker did not grow)")
    check_memory_trend(v, fault, span)
    check_outage_recovery(v, fault)
    fault.figures = outage_figures(fault, creates, ok, peak_used, peak_len, bound)
    return peak_used[1], peak_len[2]


# ---- (9) a cluster master killed ----------------------------------------------------------

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
