//! Prometheus metrics (via `prometheus-client`), exposed as OpenMetrics or classic text
//! ([`Exposition`]).
//!
//! The request counter is looked up without hashing on the hot path: each
//! (route, method, outcome) series is created on first use and kept in a slot indexed by the
//! route's position, a method index and the outcome. The series of a guarded route's guarded
//! methods start at zero ([`Metrics::start_guarded`]), so that the first outcome-unknown or
//! fail-open request is an increase that `rate()` and the alerts see, not a new series.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::exposition::{classic_from_openmetrics, Exposition};
use super::Outcome;

type RequestLabels = [(&'static str, String); 3];
type OneLabel = [(&'static str, &'static str); 1];

/// Methods with their own label value; the rest count as `other`.
const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// A store operation, as labelled in the store metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Begin,
    Complete,
    Release,
    Renew,
}

impl StoreOp {
    const ALL: [StoreOp; 4] = [StoreOp::Begin, StoreOp::Complete, StoreOp::Release, StoreOp::Renew];

    fn as_str(self) -> &'static str {
        match self {
            StoreOp::Begin => "begin",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Renew => "renew",
        }
    }
}

/// How a lease renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    Lost,
    Failed,
}

/// The disk store's metrics (docs/behaviour.md §11), kept by the store and registered with the
/// proxy's [`Metrics`] when the disk store is the one in use. Their names are a contract: alert
/// rules use them (README "Metrics").
#[derive(Clone)]
pub struct DiskStoreMetrics {
    /// `idemproxy_disk_store_records`: records indexed, live or expired and not yet forgotten.
    pub records: Gauge,
    /// `idemproxy_disk_store_bytes`: size of the store's segment files.
    pub bytes: Gauge,
    /// `idemproxy_disk_store_max_bytes`: `store.max_disk_bytes`.
    pub max_bytes: Gauge,
    /// `idemproxy_disk_store_flushes_total`: flushes (`fdatasync`), each making every write
    /// appended before it durable.
    pub flushes: Counter,
    /// `idemproxy_disk_store_flush_duration_seconds`: time of one flush.
    pub flush_duration: Histogram,
}

impl Default for DiskStoreMetrics {
    fn default() -> Self {
        Self {
            records: Gauge::default(),
            bytes: Gauge::default(),
            max_bytes: Gauge::default(),
            flushes: Counter::default(),
            flush_duration: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        }
    }
}

/// Replica acknowledgements of Redis writes (`WAIT`, docs/behaviour.md §4.4), one observation
/// per write waited for: `idemproxy_redis_replica_acks_total{result}` and
/// `idemproxy_redis_replica_wait_seconds`. A clone counts into the same series; the store gets
/// one from [`Metrics::replica_acks`] (or a [`Default`] one, registered nowhere).
#[derive(Clone, Debug)]
pub struct ReplicaAcks {
    acknowledged: Counter,
    timed_out: Counter,
    wait: Histogram,
}

impl Default for ReplicaAcks {
    fn default() -> Self {
        Self {
            acknowledged: Counter::default(),
            timed_out: Counter::default(),
            wait: Histogram::new(latency_buckets()),
        }
    }
}

impl ReplicaAcks {
    /// One write's wait for its acknowledgements: `waited` long, `acknowledged` by enough
    /// replicas or not (too few in time, or no answer).
    pub fn observe(&self, waited: Duration, acknowledged: bool) {
        self.wait.observe(waited.as_secs_f64());
        if acknowledged {
            self.acknowledged.inc();
        } else {
            self.timed_out.inc();
        }
    }

    /// A write not waited for (its master's batches were stuck): not acknowledged, no wait.
    pub fn not_waited_for(&self) {
        self.timed_out.inc();
    }

    /// The series registered in `registry`, both label values present from the start.
    fn registered(registry: &mut Registry) -> Self {
        let acks = Family::<OneLabel, Counter>::default();
        registry.register(
            "redis_replica_acks",
            "Redis writes waited for until min_replicas replicas acknowledged them (WAIT), by result",
            acks.clone(),
        );
        let wait = Histogram::new(latency_buckets());
        registry.register(
            "redis_replica_wait_seconds",
            "Time a Redis write waited for its replica acknowledgements (WAIT)",
            wait.clone(),
        );
        // One at a time: see `Metrics::new`.
        let acknowledged = acks.get_or_create(&[("result", "acknowledged")]).clone();
        let timed_out = acks.get_or_create(&[("result", "timed_out")]).clone();
        Self {
            acknowledged,
            timed_out,
            wait,
        }
    }
}

/// Requests waiting for a key in flight (`on_conflict = "wait"`, docs/behaviour.md §15):
/// `idemproxy_wait_wakeups_total{reason}` (`settled`: the key settled; `lost`: the store's
/// subscription was lost, so the waiter looked again; `timed_out`: `wait_timeout` passed) and
/// `idemproxy_redis_subscription_losses_total` (the Redis subscription connection was lost). A
/// clone counts into the same series; a [`Default`] one is registered nowhere.
#[derive(Clone, Debug, Default)]
pub struct WaitMetrics {
    settled: Counter,
    lost: Counter,
    timed_out: Counter,
    subscription_losses: Counter,
}

impl WaitMetrics {
    /// A waiter woke because its key settled.
    pub fn woken_settled(&self) {
        self.settled.inc();
    }

    /// A waiter woke because the subscription was lost.
    pub fn woken_lost(&self) {
        self.lost.inc();
    }

    /// A waiter's `wait_timeout` passed.
    pub fn timed_out(&self) {
        self.timed_out.inc();
    }

    /// The Redis subscription connection was lost.
    pub fn subscription_lost(&self) {
        self.subscription_losses.inc();
    }

    fn registered(registry: &mut Registry) -> Self {
        let wakeups = Family::<OneLabel, Counter>::default();
        registry.register(
            "wait_wakeups",
            "Wakeups of requests waiting for a key in flight (on_conflict = wait), by reason",
            wakeups.clone(),
        );
        let subscription_losses = Counter::default();
        registry.register(
            "redis_subscription_losses",
            "Redis subscription connections (keys waited for) lost",
            subscription_losses.clone(),
        );
        // One at a time: see `Metrics::new`.
        let settled = wakeups.get_or_create(&[("reason", "settled")]).clone();
        let lost = wakeups.get_or_create(&[("reason", "lost")]).clone();
        let timed_out = wakeups.get_or_create(&[("reason", "timed_out")]).clone();
        Self {
            settled,
            lost,
            timed_out,
            subscription_losses,
        }
    }
}

/// All metrics of one proxy.
pub struct Metrics {
    registry: Registry,
    route_names: Vec<String>,
    requests: Family<RequestLabels, Counter>,
    request_slots: Vec<OnceLock<Counter>>,
    upstream_duration: Vec<Histogram>,
    store_duration: Vec<Histogram>,
    store_errors: Vec<Counter>,
    lease_renewals: [Counter; 3],
    in_flight: Gauge,
    ready: Gauge,
    replica_acks: ReplicaAcks,
    wait: WaitMetrics,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// A gauge registered in `registry`.
fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    registry.register(name, help, gauge.clone());
    gauge
}

impl Metrics {
    /// Metrics for these routes (in the configuration's order).
    pub fn new<'a>(route_names: impl IntoIterator<Item = &'a str>) -> Self {
        let route_names: Vec<String> = route_names.into_iter().map(str::to_owned).collect();
        let mut registry = Registry::with_prefix("idemproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handled, by route, method and outcome",
            requests.clone(),
        );
        let upstream_family =
            Family::<[(&'static str, String); 1], Histogram>::new_with_constructor(
                || Histogram::new(latency_buckets()),
            );
        registry.register(
            "upstream_duration_seconds",
            "Time to the upstream's response head (pass-through) or whole response (guarded)",
            upstream_family.clone(),
        );
        let upstream_duration = route_names
            .iter()
            .map(|r| upstream_family.get_or_create(&[("route", r.clone())]).clone())
            .collect();
        let store_family = Family::<OneLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "store_duration_seconds",
            "Store round-trip time, by operation",
            store_family.clone(),
        );
        let store_error_family = Family::<OneLabel, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed (unreachable, timeout, corrupt record)",
            store_error_family.clone(),
        );
        let store_duration = StoreOp::ALL
            .iter()
            .map(|op| store_family.get_or_create(&[("op", op.as_str())]).clone())
            .collect();
        let store_errors = StoreOp::ALL
            .iter()
            .map(|op| store_error_family.get_or_create(&[("op", op.as_str())]).clone())
            .collect();
        let renewal_family = Family::<OneLabel, Counter>::default();
        registry.register(
            "lease_renewals",
            "Lease renewals while a slow upstream runs, by result",
            renewal_family.clone(),
        );
        // One at a time: `get_or_create`'s guard lives to the end of its statement, and a
        // second call in the same expression would wait on it forever.
        let renewal = |result: &'static str| renewal_family.get_or_create(&[("result", result)]).clone();
        let lease_renewals = [renewal("renewed"), renewal("lost"), renewal("failed")];
        let in_flight = gauge(&mut registry, "in_flight_requests", "Requests being handled right now");
        let ready = gauge(
            &mut registry,
            "ready",
            "1 when the last readiness check passed (store answers, upstreams accept connections), else 0",
        );
        let replica_acks = ReplicaAcks::registered(&mut registry);
        let wait = WaitMetrics::registered(&mut registry);
        let slots = route_names.len() * METHODS.len() * Outcome::ALL.len();
        Self {
            registry,
            request_slots: (0..slots).map(|_| OnceLock::new()).collect(),
            route_names,
            requests,
            upstream_duration,
            store_duration,
            store_errors,
            lease_renewals,
            in_flight,
            ready,
            replica_acks,
            wait,
        }
    }

    /// The metrics of waiting requests, for the proxy and the Redis store to count into.
    pub fn wait(&self) -> &WaitMetrics {
        &self.wait
    }

    /// The replica acknowledgement metrics, for the Redis store to count into.
    pub fn replica_acks(&self) -> ReplicaAcks {
        self.replica_acks.clone()
    }

    /// Starts the request series of a guarded route's guarded methods at zero, one per outcome.
    pub fn start_guarded(&self, route: usize, methods: &[Method]) {
        let Some(name) = self.route_names.get(route) else {
            return;
        };
        for method in methods {
            let method_index = method_index(method);
            for outcome in Outcome::ALL {
                let slot = self.slot(route, method_index, outcome);
                self.request_slots[slot].get_or_init(|| {
                    self.requests
                        .get_or_create(&[
                            ("route", name.clone()),
                            ("method", METHODS[method_index].to_owned()),
                            ("outcome", outcome.as_str().to_owned()),
                        ])
                        .clone()
                });
            }
        }
    }

    /// Adds the disk store's metrics to the exposition.
    pub fn register_disk_store(&mut self, disk: &DiskStoreMetrics) {
        let registry = &mut self.registry;
        registry.register(
            "disk_store_records",
            "Records in the disk store (live, or expired and not yet swept)",
            disk.records.clone(),
        );
        registry.register(
            "disk_store_bytes",
            "Size of the disk store's file, bytes",
            disk.bytes.clone(),
        );
        registry.register(
            "disk_store_max_bytes",
            "store.max_disk_bytes: new keys are refused beyond it",
            disk.max_bytes.clone(),
        );
        registry.register(
            "disk_store_flushes",
            "Disk store commits flushed to disk (group commit: one per batch of writes)",
            disk.flushes.clone(),
        );
        registry.register(
            "disk_store_flush_duration_seconds",
            "Time of one disk store commit, its flush included",
            disk.flush_duration.clone(),
        );
    }

    fn slot(&self, route: usize, method_index: usize, outcome: Outcome) -> usize {
        (route * METHODS.len() + method_index) * Outcome::ALL.len() + outcome as usize
    }

    /// Counts one finished request. `route` is the route's index (`None`: no route matched).
    pub fn request(&self, route: Option<usize>, method: &Method, outcome: Outcome) {
        let method_index = method_index(method);
        let Some(route) = route.filter(|r| *r < self.route_names.len()) else {
            self.requests
                .get_or_create(&[
                    ("route", "-".to_owned()),
                    ("method", METHODS[method_index].to_owned()),
                    ("outcome", outcome.as_str().to_owned()),
                ])
                .inc();
            return;
        };
        let slot = self.slot(route, method_index, outcome);
        let counter = self.request_slots[slot].get_or_init(|| {
            self.requests
                .get_or_create(&[
                    ("route", self.route_names[route].clone()),
                    ("method", METHODS[method_index].to_owned()),
                    ("outcome", outcome.as_str().to_owned()),
                ])
                .clone()
        });
        counter.inc();
    }

    pub fn upstream_duration(&self, route: usize, elapsed: Duration) {
        if let Some(histogram) = self.upstream_duration.get(route) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }

    pub fn store_call(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        let index = op as usize;
        self.store_duration[index].observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors[index].inc();
        }
    }

    /// Awaits a store call, recording its latency and whether it failed.
    pub async fn timed<T, E>(&self, op: StoreOp, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.store_call(op, started.elapsed(), result.is_ok());
        result
    }

    pub fn lease_renewal(&self, renewal: Renewal) {
        self.lease_renewals[renewal as usize].inc();
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlightGuard<'_> {
        self.in_flight.inc();
        InFlightGuard(&self.in_flight)
    }

    /// Records the result of a readiness check.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Every metric, in `format`.
    pub fn render(&self, format: Exposition) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Classic => classic_from_openmetrics(&out),
        }
    }
}

/// Decrements the in-flight gauge on drop (also when the client goes away mid-request).
pub struct InFlightGuard<'a>(&'a Gauge);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counted_requests() {
        let metrics = Metrics::new(["default"]);
        metrics.request(Some(0), &Method::POST, Outcome::Replayed);
        metrics.request(Some(0), &Method::POST, Outcome::Replayed);
        metrics.request(None, &Method::GET, Outcome::BadRequest);
        metrics.store_call(StoreOp::Begin, Duration::from_millis(1), false);
        {
            let _guard = metrics.in_flight();
        }
        let text = metrics.render(Exposition::OpenMetrics);
        assert!(
            text.contains(r#"idemproxy_requests_total{route="default",method="POST",outcome="replayed"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"idemproxy_requests_total{route="-",method="GET",outcome="bad_request"} 1"#));
        assert!(text.contains(r#"idemproxy_store_errors_total{op="begin"} 1"#));
        assert!(text.contains("idemproxy_in_flight_requests 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn guarded_series_start_at_zero() {
        let metrics = Metrics::new(["a", "b"]);
        metrics.start_guarded(1, &[Method::POST, Method::PATCH]);
        metrics.start_guarded(7, &[Method::POST]);
        metrics.request(Some(1), &Method::POST, Outcome::OutcomeUnknown);
        let text = metrics.render(Exposition::Classic);
        for line in [
            r#"idemproxy_requests_total{route="b",method="PATCH",outcome="fail_open"} 0"#,
            r#"idemproxy_requests_total{route="b",method="POST",outcome="outcome_unknown"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in {text}");
        }
        assert!(!text.contains(r#"idemproxy_requests_total{route="a""#), "{text}");
    }

    #[test]
    fn classic_rendering_types_every_family() {
        let metrics = Metrics::new(["default"]);
        metrics.set_ready(true);
        metrics.request(Some(0), &Method::GET, Outcome::Passthrough);
        let text = format!("\n{}", metrics.render(Exposition::Classic));
        for (family, kind) in [
            ("idemproxy_requests_total", "counter"),
            ("idemproxy_store_errors_total", "counter"),
            ("idemproxy_lease_renewals_total", "counter"),
            ("idemproxy_upstream_duration_seconds", "histogram"),
            ("idemproxy_store_duration_seconds", "histogram"),
            ("idemproxy_in_flight_requests", "gauge"),
            ("idemproxy_ready", "gauge"),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {family} {kind}\n")),
                "{family} in {text}"
            );
            assert!(text.contains(&format!("# HELP {family} ")), "{family} in {text}");
        }
        assert!(text.contains("\nidemproxy_ready 1\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }

    #[test]
    fn replica_acknowledgements_are_counted_under_their_exact_names() {
        let metrics = Metrics::new(["default"]);
        let text = metrics.render(Exposition::Classic);
        assert!(
            text.contains(r#"idemproxy_redis_replica_acks_total{result="timed_out"} 0"#),
            "{text}"
        );
        let acks = metrics.replica_acks();
        acks.observe(Duration::from_millis(2), true);
        acks.observe(Duration::from_millis(3), true);
        acks.observe(Duration::from_secs(1), false);
        let text = metrics.render(Exposition::Classic);
        assert!(
            text.contains(r#"idemproxy_redis_replica_acks_total{result="acknowledged"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"idemproxy_redis_replica_acks_total{result="timed_out"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE idemproxy_redis_replica_wait_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("idemproxy_redis_replica_wait_seconds_count 3"), "{text}");
    }

    #[test]
    fn disk_store_metrics_have_the_names_alert_rules_use() {
        let mut metrics = Metrics::new(["default"]);
        let disk = DiskStoreMetrics::default();
        metrics.register_disk_store(&disk);
        disk.records.set(3);
        disk.max_bytes.set(1 << 30);
        disk.flushes.inc();
        disk.flush_duration.observe(0.0002);
        let text = metrics.render(Exposition::Classic);
        for line in [
            "idemproxy_disk_store_records 3",
            "idemproxy_disk_store_bytes 0",
            "idemproxy_disk_store_max_bytes 1073741824",
            "idemproxy_disk_store_flushes_total 1",
            "idemproxy_disk_store_flush_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
