//! A Redis Cluster losing a master: only the applications whose shard it served are
//! refused (503 with `Retry-After`, quickly, never a 500), the others go on, and once it
//! is back nothing accepted is lost or duplicated.
//!
//! The test runs a 3-master cluster of its own (real `redis-server` processes): the
//! shared one of `scripts/test` cannot lose a master.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{Options, TestApp, eventually};

struct PrivateCluster {
    ports: [u16; 3],
    nodes: Vec<Option<Child>>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateCluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "chat-system-cluster-{:016x}",
            getrandom::u64().unwrap()
        ));
        let ports = [free_port(), free_port(), free_port()];
        let mut cluster = Self {
            ports,
            nodes: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let node = cluster.spawn(i);
            cluster.nodes.push(Some(node));
        }
        for port in ports {
            wait_for_ping(port).await;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli (installed by scripts/deps)");
        assert!(created.success());
        for port in ports {
            eventually(Duration::from_secs(20), "cluster_state:ok", || async move {
                cluster_info(port).await.contains("cluster_state:ok")
            })
            .await;
        }
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        let dir = self.dir.join(self.ports[i].to_string());
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("redis-server")
            .args(["--port", &self.ports[i].to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-require-full-coverage", "no"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server")
    }

    fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node serving `slot`.
    async fn owner_of(&self, slot: u16) -> usize {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[0])).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|range| {
                let redis::Value::Array(items) = range else {
                    panic!("CLUSTER SLOTS")
                };
                let start: u16 = redis::from_redis_value(items[0].clone()).unwrap();
                let end: u16 = redis::from_redis_value(items[1].clone()).unwrap();
                let redis::Value::Array(master) = items[2].clone() else {
                    panic!("CLUSTER SLOTS")
                };
                let host: String = redis::from_redis_value(master[0].clone()).unwrap();
                let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
                (start, end, (host, port))
            })
            .collect();
        let (_, _, (_, port)) = ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .expect("every slot is served");
        self.ports.iter().position(|p| p == port).unwrap()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self, i: usize) {
        self.nodes[i] = Some(self.spawn(i));
        wait_for_ping(self.ports[i]).await;
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for_ping(port: u16) {
    eventually(Duration::from_secs(20), "a cluster node", || async move {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            return false;
        };
        match client.get_multiplexed_async_connection().await {
            Ok(mut conn) => redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

async fn cluster_info(port: u16) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return String::new();
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return String::new();
    };
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_refuses_only_its_own_applications_and_loses_nothing() {
    let mut cluster = PrivateCluster::start().await;
    let mut app = TestApp::with(Options {
        redis_cluster_nodes: Some(cluster.seeds()),
        ..Options::default()
    })
    .await;

    // Applications until each master serves at least one.
    let keys = app.store.queue.keys.clone();
    let mut by_node: HashMap<usize, Vec<String>> = HashMap::new();
    while by_node.len() < 3 || by_node.values().any(|t| t.len() < 2) {
        let token = app.application("a").await;
        let node = cluster.owner_of(keys.slot_of(keys.shard_of(&token))).await;
        app.chat(&token).await;
        by_node.entry(node).or_default().push(token);
    }
    let doomed = 0;
    cluster.kill(doomed);

    let mut accepted: Vec<(String, u64, String)> = Vec::new();
    for round in 0..5 {
        for (node, tokens) in &by_node {
            for token in tokens {
                let body = format!("round {round}");
                let started = Instant::now();
                let reply = app
                    .post(
                        &format!("/applications/{token}/chats/1/messages"),
                        json!({ "body": body }),
                    )
                    .await;
                assert!(
                    started.elapsed() < Duration::from_secs(8),
                    "answered in {:?}",
                    started.elapsed()
                );
                if *node == doomed {
                    reply.assert_problem(503);
                    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
                } else {
                    assert_eq!(reply.status, 201, "{}", reply.body);
                    let number = reply.body["number"].as_u64().unwrap();
                    accepted.push((token.clone(), number, body));
                }
            }
        }
    }
    // Reads of the live masters' applications work too, pending or not.
    let (token, number, body) = &accepted[0];
    let read = app
        .get(&format!("/applications/{token}/chats/1/messages/{number}"))
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["body"], body.as_str());

    cluster.restart(doomed).await;
    eventually(Duration::from_secs(30), "the cluster to heal", || async {
        cluster_info(cluster.ports[1])
            .await
            .contains("cluster_state:ok")
            && app.store.queue.ping().await.is_ok()
    })
    .await;
    // The doomed master's applications work again and continue their numbering.
    let token = &by_node[&doomed][0];
    eventually(
        Duration::from_secs(30),
        "creates on the restarted master",
        || async {
            let reply = app
                .post(
                    &format!("/applications/{token}/chats/1/messages"),
                    json!({ "body": "after" }),
                )
                .await;
            if reply.status == 201 {
                assert_eq!(reply.body["number"], 1, "{}", reply.body);
            }
            reply.status == 201
        },
    )
    .await;

    app.drain().await;
    let rows: Vec<(String, u64, String)> = sqlx::query_as(
        "SELECT a.token, m.number, m.body FROM messages m \
         JOIN applications a ON a.id = m.application_id ORDER BY a.token, m.number",
    )
    .fetch_all(&app.store.mysql)
    .await
    .unwrap();
    for (token, number, body) in &accepted {
        let found: Vec<_> = rows
            .iter()
            .filter(|(t, n, _)| t == token && n == number)
            .collect();
        assert_eq!(found.len(), 1, "{token} message {number}: {found:?}");
        assert_eq!(&found[0].2, body);
    }
    assert_eq!(
        rows.len(),
        accepted.len() + 1,
        "nothing lost, nothing duplicated"
    );
}
