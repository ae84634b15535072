//! Prometheus metrics (text exposition format, via `prometheus-client`).
//!
//! The request counter is looked up without hashing on the hot path: each
//! (route, method, outcome) series is created on first use and kept in a slot indexed by the
//! route's position, a method index and the outcome.

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
    /// `idemproxy_disk_store_records`: records on disk, live or expired and not yet swept.
    pub records: Gauge,
    /// `idemproxy_disk_store_bytes`: size of the store's file.
    pub bytes: Gauge,
    /// `idemproxy_disk_store_max_bytes`: `store.max_disk_bytes`.
    pub max_bytes: Gauge,
    /// `idemproxy_disk_store_flushes_total`: commits flushed to disk (each shared by every
    /// write waiting for it).
    pub flushes: Counter,
    /// `idemproxy_disk_store_flush_duration_seconds`: time of one commit and its flush.
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
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
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
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled right now",
            in_flight.clone(),
        );
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

    /// Counts one finished request. `route` is the route's index (`None`: no route matched).
    pub fn request(&self, route: Option<usize>, method: &Method, outcome: Outcome) {
        let method_index = method_index(method);
        let outcome_index = outcome as usize;
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
        let slot = (route * METHODS.len() + method_index) * Outcome::ALL.len() + outcome_index;
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

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
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
        let text = metrics.render();
        assert!(
            text.contains(r#"idemproxy_requests_total{route="default",method="POST",outcome="replayed"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"idemproxy_requests_total{route="-",method="GET",outcome="bad_request"} 1"#));
        assert!(text.contains(r#"idemproxy_store_errors_total{op="begin"} 1"#));
        assert!(text.contains("idemproxy_in_flight_requests 0"));
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
        let text = metrics.render();
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
