//! Redis Cluster: a real 3-master cluster of `redis-server --cluster-enabled yes` processes,
//! created with `redis-cli --cluster create`, shared by two proxies; and one whose masters have
//! a replica each, with `store.min_replicas = 1` (docs/behaviour.md §4.4).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{count_status, free_port, start_harness, TestClient, TestProxy, TestUpstream};
use futures::future::join_all;
use http::{Method, StatusCode};

/// Three cluster-enabled masters on ephemeral ports, killed on drop.
/// A free port for a cluster node whose cluster bus port (the port + 10000) is free too: a node
/// whose bus port is taken never starts.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free {
            return port;
        }
    }
}

struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dirs: Vec<tempfile::TempDir>,
}

impl RedisCluster {
    fn start() -> Self {
        Self::start_on((0..3).map(|_| cluster_port()).collect())
    }

    /// A cluster of one master on each of `ports`.
    fn start_on(ports: Vec<u16>) -> Self {
        Self::start_nodes(ports, 0)
    }

    /// Three masters, each with `replicas` replicas, once every master has them attached.
    fn start_with_replicas(replicas: usize) -> Self {
        let cluster = Self::start_nodes((0..3 * (1 + replicas)).map(|_| cluster_port()).collect(), replicas);
        for port in cluster.masters() {
            cluster.wait_for(port, "INFO replication", &format!("connected_slaves:{replicas}"));
            cluster.wait_for(port, "INFO replication", "state=online");
        }
        cluster
    }

    /// The nodes on `ports`, `replicas` of them per master.
    fn start_nodes(ports: Vec<u16>, replicas: usize) -> Self {
        let mut children = Vec::new();
        let mut dirs = Vec::new();
        for &port in &ports {
            let dir = tempfile::tempdir().expect("temp dir");
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            children.push(child);
            dirs.push(dir);
        }
        let cluster = Self {
            ports,
            children,
            _dirs: dirs,
        };
        for port in &cluster.ports {
            cluster.wait_for(*port, "PING", "PONG");
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster create failed");
        for port in &cluster.ports {
            cluster.wait_for(*port, "CLUSTER INFO", "cluster_state:ok");
        }
        cluster
    }

    fn wait_for(&self, port: u16, command: &str, expect: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let output = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(command.split(' '))
                .output();
            if output.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(expect)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis node {port} never answered {command} with {expect}");
    }

    fn url(&self) -> String {
        cluster_url(&self.ports)
    }

    /// `redis-cli -p port <command>`'s output.
    fn cli(&self, port: u16, command: &str) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(command.split(' '))
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The ports of the nodes that are masters now.
    fn masters(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|port| self.cli(*port, "ROLE").starts_with("master"))
            .collect()
    }

    /// Keys stored on each node.
    fn keys_per_node(&self) -> Vec<usize> {
        self.ports
            .iter()
            .map(|port| {
                let output = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "DBSIZE"])
                    .output()
                    .expect("redis-cli runs");
                String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0)
            })
            .collect()
    }
}

fn cluster_url(ports: &[u16]) -> String {
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("redis+cluster://{}", nodes.join(","))
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn two_proxies_on_a_three_master_cluster_execute_each_key_once() {
    let cluster = RedisCluster::start();
    let upstream = TestUpstream::start().await;
    let store = format!("store.redis = \"{}\"", cluster.url());
    let a = TestProxy::to(&upstream).config(&store).start().await;
    let b = TestProxy::to(&upstream).config(&store).start().await;
    // 30 keys spread over the slots, each sent 4 times at once through both proxies.
    let requests = (0..30).flat_map(|k| {
        let urls = [a.url("/orders"), b.url("/orders"), a.url("/orders"), b.url("/orders")];
        urls.into_iter().map(move |url| async move {
            TestClient::new()
                .send(
                    Method::POST,
                    &url,
                    &[
                        ("idempotency-key", &format!("cluster-{k}")),
                        ("x-upstream-delay-ms", "200"),
                    ],
                    "{}",
                )
                .await
        })
    });
    let responses = join_all(requests).await;
    assert_eq!(upstream.hits(), 30, "each key executed exactly once");
    assert_eq!(count_status(&responses, StatusCode::CREATED), 30);
    assert_eq!(count_status(&responses, StatusCode::CONFLICT), 90);
    for k in 0..30 {
        let replay = TestClient::new()
            .post_keyed(&b.url("/orders"), &format!("cluster-{k}"), "{}")
            .await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.hits(), 30);
    let per_node = cluster.keys_per_node();
    assert_eq!(
        per_node.iter().sum::<usize>(),
        30,
        "one record per key, no lease left: {per_node:?}"
    );
    assert!(
        per_node.iter().all(|n| *n > 0),
        "keys spread over all masters: {per_node:?}"
    );
}

/// Like with a single Redis, a proxy starts while its cluster is unreachable (and serves
/// pass-through traffic): guarded requests are a store failure (`503`) until the cluster
/// answers, then they are protected as usual.
#[tokio::test]
async fn a_proxy_starts_before_its_cluster_and_uses_it_once_it_is_up() {
    let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
    let store = format!(
        "store.redis = \"{}\"\nstore.command_timeout = \"500ms\"",
        cluster_url(&ports)
    );
    let (upstream, proxy, client) = start_harness(|up| TestProxy::to(up).config(&store)).await;
    let early = client.post_keyed(&proxy.url("/orders"), "early", "{}").await;
    assert_eq!(
        early.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no cluster yet: a store failure"
    );
    let passthrough = client.send(Method::GET, &proxy.url("/"), &[], "").await;
    assert_eq!(
        passthrough.status,
        StatusCode::CREATED,
        "pass-through is served meanwhile"
    );
    assert_eq!(upstream.hits(), 1, "the guarded request was not forwarded");

    let _cluster = tokio::task::spawn_blocking(move || RedisCluster::start_on(ports))
        .await
        .expect("the cluster starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let executed = loop {
        let response = client.post_keyed(&proxy.url("/orders"), "later", "{}").await;
        if response.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(executed.status, StatusCode::CREATED, "executed once the cluster is up");
    let replay = client.post_keyed(&proxy.url("/orders"), "later", "{}").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 2, "executed once, then replayed");
}

/// `min_replicas = 1` on a cluster whose masters each have a replica: a key's record is written
/// to the master of its slot and acknowledged by that master's replica (one `WAIT` per master
/// written, never one that spans the cluster); each key executes once and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_wait_on_the_master_they_were_written_to() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with_replicas(1))
        .await
        .expect("the cluster starts");
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream)
        .config(&format!("store.redis = \"{}\"\nstore.min_replicas = 1", cluster.url()))
        .start()
        .await;
    let client = TestClient::new();
    let keys = (0..30).map(|k| {
        let (client, url) = (client.clone(), proxy.url("/orders"));
        async move { client.post_keyed(&url, &format!("acked-{k}"), "{}").await }
    });
    for response in join_all(keys).await {
        assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
    }
    for k in 0..30 {
        let replay = client
            .post_keyed(&proxy.url("/orders"), &format!("acked-{k}"), "{}")
            .await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.hits(), 30, "each key executed once");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for port in masters {
        let stats = cluster.cli(port, "INFO commandstats");
        assert!(
            stats.contains("cmdstat_wait:"),
            "master {port} waited for its replica: {stats}"
        );
        let keys: usize = cluster.cli(port, "DBSIZE").trim().parse().unwrap_or(0);
        assert!(keys > 0, "keys spread over every master");
    }
    let stored: usize = cluster.keys_per_node().iter().sum();
    assert_eq!(stored, 60, "every record on its master and on that master's replica");
}

/// Waiting retries on one proxy are woken by completions on another through each key's own
/// channel, published on the master of the key's slot (sharded pub/sub, docs/behaviour.md
/// §15): keys spread over the three masters, every waiter woken by its key's message.
#[tokio::test]
async fn waiters_on_another_proxy_are_woken_through_each_keys_slot() {
    let cluster = RedisCluster::start();
    let upstream = TestUpstream::start().await;
    let store = format!("store.redis = \"{}\"", cluster.url());
    let wait = "on_conflict = \"wait\"\nwait_timeout = \"10s\"";
    let a = TestProxy::to(&upstream).config(&store).idempotency(wait).start().await;
    let b = TestProxy::to(&upstream)
        .config(&store)
        .idempotency(wait)
        .admin()
        .start()
        .await;
    let send = |url: String, key: String, delay: &'static str| async move {
        let headers = [("idempotency-key", key.as_str()), ("x-upstream-delay-ms", delay)];
        TestClient::new().send(Method::POST, &url, &headers, "{}").await
    };
    let keys = 30;
    let firsts = join_all((0..keys).map(|k| send(a.url("/orders"), format!("wait-{k}"), "600")));
    let waiters = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        join_all((0..keys).map(|k| send(b.url("/orders"), format!("wait-{k}"), "0"))).await
    };
    let (firsts, waiters) = tokio::join!(firsts, waiters);
    assert_eq!(upstream.hits(), keys);
    for (first, waiter) in firsts.iter().zip(&waiters) {
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
        assert_eq!(waiter.header("idempotent-replayed"), Some("true"));
        assert_eq!(waiter.body, first.body);
    }
    let per_node = cluster.keys_per_node();
    assert!(
        per_node.iter().all(|n| *n > 0),
        "keys spread over all masters: {per_node:?}"
    );
    let admin = b.admin.expect("an admin listener");
    let metrics = TestClient::new()
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let woken = format!("idemproxy_wait_wakeups_total{{reason=\"settled\"}} {keys}");
    assert!(metrics.lines().any(|l| l == woken), "{woken} in {metrics}");
}
