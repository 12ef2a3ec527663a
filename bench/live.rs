//! Live-delivery load (not part of the product): subscribers on the API processes given,
//! a steady create rate, and the time from each create's `201` to its event at every
//! subscriber; then the private memory per idle subscriber. Prints one JSON object.
//!
//!   cargo run --release --example live -- --apis 127.0.0.1:3100,127.0.0.1:3103 \
//!       --pids 1234,1235 --subscribers 1000 --rate 2000 --seconds 20
//!
//! Subscribers are spread over the APIs and over `--chats` chats of one application;
//! creates go to both APIs in turn. `scripts/bench --live` runs it on a private stack.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    apis: Vec<String>,
    pids: Vec<u32>,
    subscribers: usize,
    rate: f64,
    seconds: f64,
    chats: u64,
    /// Soak: subscribers connect and drop (a tenth of them every second) for this many
    /// seconds under the create rate, and the APIs' private memory is sampled.
    soak: f64,
}

fn parse_args() -> Args {
    let mut args = Args {
        apis: vec!["127.0.0.1:3000".into()],
        pids: Vec::new(),
        subscribers: 1000,
        rate: 2000.0,
        seconds: 20.0,
        chats: 100,
        soak: 0.0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [name, value] = pair else {
            panic!(
                "usage: live --apis a,b --pids p,q --subscribers N --rate R --seconds S --chats C"
            )
        };
        match name.as_str() {
            "--apis" => args.apis = value.split(',').map(str::to_owned).collect(),
            "--pids" => args.pids = value.split(',').map(|p| p.parse().expect("pid")).collect(),
            "--subscribers" => args.subscribers = value.parse().expect("subscribers"),
            "--rate" => args.rate = value.parse().expect("rate"),
            "--seconds" => args.seconds = value.parse().expect("seconds"),
            "--chats" => args.chats = value.parse().expect("chats"),
            "--soak" => args.soak = value.parse().expect("soak seconds"),
            other => panic!("unknown option {other}"),
        }
    }
    args
}

/// Private (anonymous) resident memory of a process, in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// When each message's `201` arrived, by (chat, number).
type Sent = Arc<Mutex<HashMap<(u64, u64), Instant>>>;

async fn subscribe(
    client: reqwest::Client,
    url: String,
    sent: Sent,
    latencies: Arc<Mutex<Vec<f64>>>,
    opened: Arc<tokio::sync::Semaphore>,
) {
    let mut response = client.get(&url).send().await.expect("subscribe");
    assert_eq!(response.status(), 200, "subscribe {url}");
    opened.add_permits(1);
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let Ok(message) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            let key = (
                message["chat_number"].as_u64().unwrap_or(0),
                message["number"].as_u64().unwrap_or(0),
            );
            // The 201 may be read a moment after the event: then the latency is ~0.
            let at = sent.lock().unwrap().get(&key).copied();
            let latency = at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
            // Recorded at once: the task is aborted at the end of the run.
            latencies.lock().unwrap().push(latency * 1000.0);
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Subscribers connecting and dropping under a create load; answers the APIs' private
/// memory (KiB, summed) sampled every 10 s.
async fn soak(args: &Args, token: &str) -> Vec<u64> {
    let client = reqwest::Client::new();
    let base = |i: usize| format!("http://{}", args.apis[i % args.apis.len()]);
    let url = |i: usize| {
        let chat = i as u64 % args.chats + 1;
        format!(
            "{}/applications/{token}/chats/{chat}/messages/events",
            base(i)
        )
    };
    let drain = |mut response: reqwest::Response| async move {
        while let Ok(Some(_)) = response.chunk().await {}
    };
    let mut subscribers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    for i in 0..args.subscribers {
        let response = client.get(url(i)).send().await.expect("subscribe");
        subscribers.push(tokio::spawn(drain(response)));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = started;
    let mut created = 0u64;
    let mut round = 0usize;
    while started.elapsed().as_secs_f64() < args.soak {
        // A tenth of the subscribers drop, and as many connect.
        for k in 0..args.subscribers / 10 {
            let slot = (round * (args.subscribers / 10) + k) % args.subscribers;
            subscribers[slot].abort();
            let response = client.get(url(slot)).send().await.expect("subscribe");
            subscribers[slot] = tokio::spawn(drain(response));
        }
        round += 1;
        // A second of creates at the rate.
        let second = Instant::now();
        let per_second = args.rate as u64;
        let mut batch = Vec::new();
        for i in 0..per_second {
            let chat = (created + i) % args.chats + 1;
            let url = format!(
                "{}/applications/{token}/chats/{chat}/messages",
                base(i as usize)
            );
            let client = client.clone();
            batch.push(tokio::spawn(async move {
                let _ = client
                    .post(&url)
                    .json(&json!({"body": "soak"}))
                    .send()
                    .await;
            }));
            if batch.len() >= 64 {
                for b in batch.drain(..) {
                    let _ = b.await;
                }
            }
        }
        for b in batch {
            let _ = b.await;
        }
        created += per_second;
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        if Instant::now() >= next_sample {
            samples.push(args.pids.iter().map(|&p| rss_anon_kib(p)).sum());
            next_sample += Duration::from_secs(10);
        }
    }
    for s in subscribers {
        s.abort();
    }
    samples
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let base = |i: usize| format!("http://{}", args.apis[i % args.apis.len()]);
    let app: Value = client
        .post(format!("{}/applications", base(0)))
        .json(&json!({"name": "live bench"}))
        .send()
        .await
        .expect("application")
        .json()
        .await
        .expect("application json");
    let token = app["token"].as_str().expect("token").to_owned();
    for _ in 0..args.chats {
        let created = client
            .post(format!("{}/applications/{token}/chats", base(0)))
            .json(&json!({}))
            .send()
            .await
            .expect("chat");
        assert_eq!(created.status(), 201);
    }

    if args.soak > 0.0 {
        let samples = soak(&args, &token).await;
        println!(
            "{}",
            json!({"soak_seconds": args.soak, "subscribers": args.subscribers,
            "rate": args.rate, "rss_anon_kib_every_10s": samples})
        );
        return;
    }

    let memory_before: Vec<u64> = args.pids.iter().map(|&p| rss_anon_kib(p)).collect();
    let sent: Sent = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let opened = Arc::new(tokio::sync::Semaphore::new(0));
    // Each subscriber a connection of its own, as browsers and apps have.
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let chat = i as u64 % args.chats + 1;
        let url = format!(
            "{}/applications/{token}/chats/{chat}/messages/events",
            base(i)
        );
        let own = reqwest::Client::builder().build().expect("client");
        subscribers.push(tokio::spawn(subscribe(
            own,
            url,
            sent.clone(),
            latencies.clone(),
            opened.clone(),
        )));
    }
    let _all = opened
        .acquire_many(args.subscribers as u32)
        .await
        .expect("subscribers open");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let memory_idle: Vec<u64> = args.pids.iter().map(|&p| rss_anon_kib(p)).collect();

    // The load: creates at `rate` per second, spread over the chats and the APIs.
    let total = (args.rate * args.seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let permits = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let mut creates = Vec::with_capacity(total);
    let failures = Arc::new(Mutex::new(0u64));
    for i in 0..total {
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let permit = permits.clone().acquire_owned().await.expect("permit");
        let chat = i as u64 % args.chats + 1;
        let url = format!("{}/applications/{token}/chats/{chat}/messages", base(i));
        let (client, sent, failures) = (client.clone(), sent.clone(), failures.clone());
        creates.push(tokio::spawn(async move {
            let _permit = permit;
            let reply = client
                .post(&url)
                .json(&json!({"body": format!("live {i}")}))
                .send()
                .await;
            let at = Instant::now();
            match reply {
                Ok(r) if r.status() == 201 => {
                    let body: Value = r.json().await.unwrap_or_default();
                    let number = body["number"].as_u64().unwrap_or(0);
                    sent.lock().unwrap().insert((chat, number), at);
                }
                _ => *failures.lock().unwrap() += 1,
            }
        }));
    }
    for create in creates {
        let _ = create.await;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in &subscribers {
        s.abort();
    }
    let mut all = std::mem::take(&mut *latencies.lock().unwrap());
    all.sort_by(f64::total_cmp);
    let expected = total * args.subscribers / args.chats as usize;
    let per_subscriber_kib: Vec<f64> = memory_before
        .iter()
        .zip(&memory_idle)
        .map(|(b, a)| a.saturating_sub(*b) as f64)
        .collect();
    let subscribers_per_api = args.subscribers as f64 / args.pids.len().max(1) as f64;
    let report = json!({
        "subscribers": args.subscribers,
        "apis": args.apis.len(),
        "creates": total,
        "create_failures": *failures.lock().unwrap(),
        "creates_per_s": total as f64 / load_seconds,
        "events_expected": expected,
        "events_received": all.len(),
        "latency_ms": {
            "p50": percentile(&all, 0.50),
            "p99": percentile(&all, 0.99),
            "max": all.last().copied().unwrap_or(0.0),
        },
        "idle_kib_per_subscriber": per_subscriber_kib
            .iter()
            .map(|k| k / subscribers_per_api)
            .collect::<Vec<_>>(),
    });
    println!("{report}");
}
