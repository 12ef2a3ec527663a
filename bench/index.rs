//! The embedded search index alone, in-process (not part of the product): no Redis, no
//! MySQL, no worker around it. Adds `count` messages of one body to a fresh index in
//! batches of 1,000 and commits every 20,000, as the worker's indexer does, then reports
//! the rate and the CPU the process spent per message (all of Tantivy's threads).
//!
//!   cargo run --release --example index -- <dir> [count] [body]
//!
//! `dir` is removed first. The defaults are `scripts/bench`'s backlog: 1,000,000
//! messages of `backlog message w001 lorem ipsum`.
//!
//! With `SEARCHES=N`, it then searches the chat N times, each time for a query not
//! searched before (as `scripts/bench`'s adversarial measure does: runs of
//! `abcdabcd...`), on one thread and then on two (`THREADS=1,2`), and reports the
//! latencies and the CPU per search. For the adversarial chat:
//!
//!   SEARCHES=300 cargo run --release --example index -- <dir> 20000 "$(printf 'abcd cdab %.0s' $(seq 200))"

use std::path::PathBuf;
use std::time::Instant;

use chat_system::search::MessageDoc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use chat_system::search::embedded::EmbeddedIndex;

const BATCH: u64 = 1_000;
const TOKEN: &str = "bench-token-0123456789";
const COMMIT_EVERY: u64 = 20_000;

/// User and system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` through a pointer to a live local.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: index <dir> [count] [body]"));
    let count: u64 = args.next().map_or(1_000_000, |c| c.parse().expect("count"));
    let body = args
        .next()
        .unwrap_or_else(|| "backlog message w001 lorem ipsum".to_owned());
    chat_system::process::configure_allocator();
    let _ = std::fs::remove_dir_all(&dir);
    let index = EmbeddedIndex::open(&dir, true).expect("open the index");
    let at = chrono::Utc::now();
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let commit_every: u64 =
        std::env::var("COMMIT_EVERY").map_or(COMMIT_EVERY, |c| c.parse().expect("COMMIT_EVERY"));
    let mut number = 0;
    while number < count {
        let docs = (number + 1..=(number + BATCH).min(count))
            .map(|n| MessageDoc {
                token: TOKEN.into(),
                chat: 2,
                number: n,
                body: body.clone(),
                version: 1,
                created_at: at,
                updated_at: at,
            })
            .collect::<Vec<_>>();
        number += docs.len() as u64;
        index.add(docs).expect("add");
        if number % commit_every == 0 || number == count {
            index.commit().expect("commit");
        }
    }
    let (seconds, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    println!(
        "indexed {count} messages of {} bytes in {seconds:.2} s: {:.0}/s, CPU {:.2} us per message",
        body.len(),
        count as f64 / seconds,
        cpu / count as f64 * 1e6
    );
    if let Ok(searches) = std::env::var("SEARCHES") {
        let searches: usize = searches.parse().expect("SEARCHES");
        let threads: Vec<usize> = std::env::var("THREADS").map_or(vec![1, 2], |t| {
            t.split(',').map(|t| t.parse().expect("THREADS")).collect()
        });
        for threads in threads {
            search(&index, searches, threads);
        }
    }
    drop(index);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `n`th query of `scripts/bench`'s adversarial measure: a run of `abcdabcd...`, one
/// of 4 rotations and 248 lengths, then a second such term.
fn adversarial_terms(n: usize) -> Vec<String> {
    let run = "abcd".repeat(70);
    let (rotation, length) = (n % 4, 5 + (n / 4) % 248);
    let mut terms = vec![run[rotation..rotation + length].to_owned()];
    let second = (n / 992) % 248;
    if second > 0 {
        terms.push(run[..4 + second].to_owned());
    }
    terms
}

fn search(index: &EmbeddedIndex, searches: usize, threads: usize) {
    let mut took = Vec::with_capacity(searches);
    let cpu = cpu_seconds();
    for n in 0..searches {
        let query = chat_system::search::SearchQuery {
            token: TOKEN.into(),
            chat: 2,
            terms: adversarial_terms(n + threads * 100_000),
            after: 0,
            limit: 20,
        };
        let started = Instant::now();
        index.search_on(&query, threads).expect("search");
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let cpu = cpu_seconds() - cpu;
    took.sort_by(f64::total_cmp);
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "{searches} searches on {threads} thread(s): p50 {:.2} ms, p99 {:.2} ms, CPU {:.2} ms per search",
        at(0.5),
        at(0.99),
        cpu / searches as f64 * 1e3
    );
}
