//! The embedded search index alone, in-process (not part of the product): no Redis, no
//! MySQL, no worker around it. Adds `count` messages of one body to a fresh index in
//! batches of 1,000 and commits every 20,000, as the worker's indexer does, then reports
//! the rate and the CPU the process spent per message (all of Tantivy's threads).
//!
//!   cargo run --release --example index -- <dir> [count] [body]
//!
//! `dir` is removed first. The defaults are `scripts/bench`'s backlog: 1,000,000
//! messages of `backlog message w001 lorem ipsum`.

use std::path::PathBuf;
use std::time::Instant;

use chat_system::search::MessageDoc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use chat_system::search::embedded::EmbeddedIndex;

const BATCH: u64 = 1_000;
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
                token: "bench-token-0123456789".into(),
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
    drop(index);
    let _ = std::fs::remove_dir_all(&dir);
}
