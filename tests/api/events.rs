//! Live delivery (`.../messages/events`, Server-Sent Events): across API processes, with
//! resuming by `Last-Event-ID`, and bounded per subscriber and per process.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Options, TestApp};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// An open event stream, read event by event.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), `None` at the end of the stream; fails the
    /// test after `limit`.
    async fn next(&mut self, limit: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !event.is_empty() {
                    return Some(Sse {
                        id,
                        event,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event in time")
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    async fn expect(&mut self) -> Sse {
        self.next(Duration::from_secs(10))
            .await
            .expect("the stream is open")
    }
}

fn numbers_and_kinds(events: &[Sse]) -> Vec<(u64, &str)> {
    events
        .iter()
        .map(|e| (e.data["number"].as_u64().unwrap(), e.event.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_and_edited_messages_reach_a_subscriber_in_acceptance_order() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let mut events = Events::open(&app.url(&format!("{path}/events")), None).await;

    app.message(&token, chat, "hello").await;
    app.message(&token, chat, "world").await;
    app.patch(&format!("{path}/1"), json!({"body": "hello, edited"}))
        .await;
    let got = [
        events.expect().await,
        events.expect().await,
        events.expect().await,
    ];
    assert_eq!(
        numbers_and_kinds(&got),
        [
            (1, "message.created"),
            (2, "message.created"),
            (1, "message.updated")
        ]
    );
    assert_eq!(got[0].data["body"], "hello");
    assert_eq!(got[2].data["body"], "hello, edited");
    assert!(
        got.windows(2)
            .all(|w| w[0].id < w[1].id || w[0].id.len() < w[1].id.len())
    );

    // Another chat's messages are not this stream's.
    let other = app.chat(&token).await;
    app.message(&token, other, "elsewhere").await;
    app.message(&token, chat, "third").await;
    let next = events.expect().await;
    assert_eq!(
        (
            next.data["number"].as_u64(),
            next.data["chat_number"].as_u64()
        ),
        (Some(3), Some(chat))
    );
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_resuming_by_id_gets_what_it_missed_once_then_the_live_ones() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let url = app.url(&format!("{path}/events"));
    let mut events = Events::open(&url, None).await;
    app.message(&token, chat, "m1").await;
    app.message(&token, chat, "m2").await;
    let _ = events.expect().await;
    let last = events.expect().await;
    drop(events); // the connection is cut

    // Missed: 3 and 4 (one persisted, one still pending), and an edit of 1.
    app.message(&token, chat, "m3").await;
    app.drain().await;
    app.message(&token, chat, "m4").await;
    app.patch(&format!("{path}/1"), json!({"body": "m1 edited"}))
        .await;

    let mut events = Events::open(&url, Some(&last.id)).await;
    let missed = [
        events.expect().await,
        events.expect().await,
        events.expect().await,
    ];
    assert_eq!(
        numbers_and_kinds(&missed),
        [
            (3, "message.created"),
            (4, "message.created"),
            (1, "message.updated")
        ]
    );
    assert_eq!(missed[2].data["body"], "m1 edited");
    app.message(&token, chat, "m5").await;
    let live = events.expect().await;
    assert_eq!(
        numbers_and_kinds(std::slice::from_ref(&live)),
        [(5, "message.created")]
    );

    // Resuming from the last id again: nothing is repeated.
    drop(events);
    let mut events = Events::open(&url, Some(&live.id)).await;
    app.message(&token, chat, "m6").await;
    let next = events.expect().await;
    assert_eq!(next.data["number"], 6);

    app.get(&format!(
        "/applications/{token}/chats/{}/messages/events",
        chat + 1
    ))
    .await
    .assert_problem(404);
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_cannot_keep_up_is_cut_off_and_the_others_are_not() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let url = app.url(&format!(
        "/applications/{token}/chats/{chat}/messages/events"
    ));
    let mut fast = Events::open(&url, None).await;
    let mut slow = Events::open(&url, None).await; // never read until the end
    let body = "x".repeat(60_000);
    let total = 300;
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < total {
            let event = fast.expect().await;
            seen += 1;
            assert_eq!(event.data["number"], seen);
        }
        seen
    });
    for _ in 0..total {
        app.message(&token, chat, &body).await;
    }
    assert_eq!(
        reader.await.unwrap(),
        total,
        "the fast subscriber got everything"
    );
    // The slow one gets what was buffered for it, then its stream ends.
    let mut got = 0;
    while slow.next(Duration::from_secs(10)).await.is_some() {
        got += 1;
    }
    assert!(got < total, "cut off after {got} events");
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}

#[tokio::test]
async fn past_its_most_subscribers_a_process_answers_503_with_retry_after() {
    let mut app = TestApp::with(Options {
        events_max_subscribers: Some(1),
        ..Options::default()
    })
    .await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages/events");
    let first = Events::open(&app.url(&path), None).await;
    let refused = app.get(&path).await;
    refused.assert_problem(503);
    assert!(refused.header("retry-after").is_some());
    drop(first);
    // Its place is free again once the first one is gone.
    crate::helpers::eventually(Duration::from_secs(5), "a free place", || async {
        let response = reqwest::get(app.url(&path)).await.unwrap();
        response.status() == 200
    })
    .await;
    let bad = reqwest::Client::new()
        .get(app.url(&path))
        .header("last-event-id", "not-an-id")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_request_timeout() {
    let mut app = TestApp::with(Options {
        request_timeout: Some(Duration::from_millis(500)),
        ..Options::default()
    })
    .await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let url = app.url(&format!(
        "/applications/{token}/chats/{chat}/messages/events"
    ));
    let mut events = Events::open(&url, None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.message(&token, chat, "still there").await;
    assert_eq!(events.expect().await.data["body"], "still there");
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_caught_up_in_bounded_parts() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let url = app.url(&format!(
        "/applications/{token}/chats/{chat}/messages/events"
    ));
    let mut events = Events::open(&url, None).await;
    app.message(&token, chat, "first").await;
    let first = events.expect().await;
    drop(events);
    let max = chat_system::service::CATCH_UP_MAX as u64;
    for i in 0..max + 100 {
        app.message(&token, chat, &format!("missed {i}")).await;
    }
    app.drain().await;

    // The first part: as many as one resume sends, then the stream ends.
    let mut events = Events::open(&url, Some(&first.id)).await;
    let mut last = first;
    let mut part = 0;
    while let Some(event) = events.next(Duration::from_secs(10)).await {
        part += 1;
        assert_eq!(event.data["number"].as_u64(), Some(part + 1));
        last = event;
    }
    assert_eq!(part, max);
    // The rest, from where it ended, then live.
    let mut events = Events::open(&url, Some(&last.id)).await;
    for n in max + 2..=max + 101 {
        assert_eq!(events.expect().await.data["number"].as_u64(), Some(n));
    }
    app.message(&token, chat, "live again").await;
    assert_eq!(events.expect().await.data["body"], "live again");
    // Everything accepted is persisted: the queue is left clean.
    app.drain().await;
}
