"""The chaos run's summary (printed and written to .data/chaos/summary.txt) and its
request log (.data/chaos/requests.csv)."""

from .base import DATA, RUN, percentile


class Outcome:
    """What the run found, for the summary."""

    def __init__(self, **figures):
        self.__dict__.update(figures)


def overview_rows(o):
    """The summary's table of figures over the whole run."""
    creates, load_seconds = o.creates, o.load_seconds
    failed = [r for r in creates + o.reads if r.status not in (200, 201)]
    s5xx = sum(1 for r in failed if isinstance(r.status, int) and r.status >= 500)
    s503 = sum(1 for r in failed if r.status == 503)
    hangs = sum(1 for r in failed if not isinstance(r.status, int))
    max_failed = max((r.latency for r in failed), default=0.0)
    all_latency = sorted(r.latency for r in creates)
    p99 = percentile(all_latency, 0.99)
    return [
        ("requests sent (creates)", f"{len(creates)}  ({len(creates) / load_seconds:.0f}/s)"),
        ("201s received", f"{o.ok_chats + o.ok_msgs}  ({o.ok_chats} chats, {o.ok_msgs} messages)"),
        ("rows found", f"{len(o.chat_rows) + len(o.msg_rows)}  ({len(o.chat_rows)} chats, "
                       f"{len(o.msg_rows)} messages)"),
        ("probe reads sent", f"{len(o.reads)}  (GET application / recent message; "
                             "/healthz in the flood)"),
        ("faults injected", f"{len(o.faults)}"),
        ("5xx seen", f"{s5xx}"),
        ("503s seen", f"{s503}"),
        ("hangs / connection errors", f"{hangs}"),
        ("max latency of failed requests", f"{max_failed * 1000:.0f} ms"),
        ("create latency p99 / max", f"{p99 * 1000:.1f} ms / {max(all_latency, default=0) * 1000:.0f} ms"),
        ("queue drained in", f"{o.drain_s:.1f} s"),
        ("counts converged in", "NO" if o.counts_s is None else f"{o.counts_s:.1f} s"),
        ("search: sample found in", ("NO" if o.search_s is None else f"{o.search_s:.1f} s")
         + f"  ({o.sampled} sampled: {o.sampled_killed} from index-writer kills, "
           f"{o.sampled_frozen} from the search outage)"),
        ("dead-letter entries", f"{o.dlq}"),
    ]


def fault_lines(per_fault):
    """Each fault's times, detail, outcomes and figures."""
    out = []
    for f, n, ok, n503, nr, r503 in per_fault:
        out.append(f"  {f.t_begin:6.1f}–{f.t_end:5.1f}s  {f.name}: {f.detail}")
        out.append(f"  {'':14}creates {n}: {ok} × 201, {n503} × 503; reads {nr}: {r503} × 503")
        for line in getattr(f, "figures", []):
            out.append(f"  {'':14}{line}")
        if hasattr(f, "split"):
            o_ok, o_n, m503, m_n = f.split
            out.append(f"  {'':14}while down: other masters' creates {o_ok}/{o_n} × 201, "
                       f"its own {m503}/{m_n} × 503")
        if f.dependency == "mysql":
            c_ok, c_n = f.creates_while_down
            a503, an = f.app_reads_while_down
            out.append(f"  {'':14}while certainly down: message creates {c_ok}/{c_n} × 201, "
                       f"GET application {a503}/{an} × 503")
    return out


def verdict_lines(v):
    out = [f"  warning: {w}" for w in v.warnings]
    if v.violations:
        out.append(f"  FAILED: {len(v.violations)} violation(s)")
        out += [f"  violation {x}" for x in v.violations]
    else:
        out.append("  PASSED: no violation (1 persisted exactly once, 2 numbers gap-free, "
                   "3 counts converge, 4 search catches up, 5 fast 503s only, 6 served "
                   "through the connection flood, "
                   + ("8 search outage bounded and recovered, 9 a dead master refused only "
                      "its own applications)" if RUN.cluster else
                      "7 overloaded not broken at maxmemory, 8 search outage bounded and "
                      "recovered)"))
    return out


def summary(o, v, elapsed):
    """The summary's text."""
    lines = ["",
             f"chaos summary — run {o.run} ({'short' if o.short else 'full'}), "
             f"{o.load_seconds:.0f} s of load, {elapsed:.0f} s in all",
             ""]
    rows = overview_rows(o)
    width = max(len(k) for k, _ in rows)
    lines.append(f"  {'metric'.ljust(width)}  value")
    lines.append(f"  {'-' * width}  {'-' * 30}")
    lines += [f"  {k.ljust(width)}  {val}" for k, val in rows]
    lines += ["",
              "  faults (seconds since the load began; creates and reads overlapping the fault,",
              "  dependency faults with 3 s of grace after recovery):"]
    lines += fault_lines(o.per_fault)
    for name, g in o.groups.items():
        lines.append(f"  consumer group {name}: pending {g.get('pending')}, lag {g.get('lag')}, "
                     f"consumers {g.get('consumers')}")
    lines.append("")
    lines += verdict_lines(v)
    return "\n".join(lines)


def write_requests(records):
    with open(DATA / "requests.csv", "w") as f:
        f.write("kind,api,start_s,end_s,latency_ms,status,token,chat,number,text,detail\n")
        for r in sorted(records, key=lambda r: r.t0):
            detail = (r.detail or "").replace(",", ";").replace("\n", " ")
            f.write(f"{r.kind},api{r.api + 1},{r.t0:.4f},{r.t1:.4f},{r.latency * 1000:.1f},"
                    f"{r.status},{r.token},{r.chat or ''},{r.number or ''},{r.text or ''},"
                    f"{detail}\n")
