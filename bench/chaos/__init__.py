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

The package, run as `python3 -m chaos` with bench/ on PYTHONPATH (scripts/chaos does):
base (settings, clock, log), stack (processes and dependencies), load (clients, the
create load, the connection flood), faults (the injectors), checks and fault_checks
(the verdict), report (the summary) and main (the schedule and the command line).
"""
