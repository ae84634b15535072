//! The HTTP/1.1 client to the upstreams (`http://` and `https://`): which connection a request
//! goes over, and what its failure means.
//!
//! Connections are hyper's `client::conn::http1`, kept in this module's own pools:
//! - [`Upstream`] (here): picks the connection, sends, sorts failures into [`UpstreamError`];
//! - `pool`: one idle list per upstream origin, its limits and expiry;
//! - [`Affinity`] (`affinity`): a client connection's slot for the upstream connection it used
//!   last;
//! - `connection`: opening connections (connect timeout, TLS roots, handshake, connection task);
//! - `error`: [`UpstreamError`].
//!
//! A request goes over, in this order: the connection its client connection used last, if that
//! one goes to the same origin and is idle; else the origin's most recently used idle
//! connection; else a new connection.
//!
//! The keep-alive race (RFC 9112 §9.3.1): an idle connection the upstream closes just as a
//! request is queued on it. hyper hands such a request back *unwritten*
//! (`try_send_request`), and it goes over the next connection in the same order (another idle
//! one, else a new one). It never reached the upstream, so this cannot execute a POST twice. A
//! request that was written, even partly, is never re-sent, and a new connection's failure is
//! final.
//!
//! The idle connections past `upstream.pool_idle_timeout` are closed by
//! [`Upstream::idle_reaper`], which the server runs.

mod affinity;
mod connection;
mod error;
mod pool;
#[cfg(test)]
mod test_support;

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response, Uri};
use hyper::body::Incoming;

pub use self::affinity::Affinity;
use self::connection::Connector;
#[cfg(test)]
pub(crate) use self::error::hyper_error;
pub use self::error::{BoxError, UpstreamError};
use self::pool::Pools;
use crate::body::ProxyBody;
use crate::config::{ConfigError, Route, UpstreamSettings};

/// The shared upstream client: keep-alive pools for all routes and both schemes.
#[derive(Clone)]
pub struct Upstream {
    connector: Connector,
    pools: Arc<Pools>,
    /// Route index → pool index (routes to one origin share its pool).
    route_pool: Arc<[usize]>,
}

impl Upstream {
    /// Builds the client for `routes`; fails (naming `upstream.ca_file`) if that file cannot be
    /// used. Starts nothing: the server runs [`Upstream::idle_reaper`].
    pub fn new(settings: &UpstreamSettings, routes: &[Arc<Route>]) -> Result<Self, ConfigError> {
        let connector = Connector::new(settings)?;
        let (origins, route_pool) = origins(routes)?;
        let pools = Pools::new(origins, settings.pool_idle_timeout, settings.pool_max_idle_per_host);
        Ok(Self {
            connector,
            pools: Arc::new(pools),
            route_pool: route_pool.into(),
        })
    }

    /// A new, empty affinity slot for one client connection.
    pub fn affinity(&self) -> Affinity {
        Affinity::new(self.pools.clone())
    }

    /// Closes idle connections past `upstream.pool_idle_timeout`, every half of it, until this
    /// client, its clones and every [`Affinity`] are dropped (it holds none of them). For the
    /// server to spawn once.
    pub fn idle_reaper(&self) -> impl Future<Output = ()> + Send + 'static {
        self.pools.reaper()
    }

    /// Sends `request` (origin-form target) to `route`'s upstream and returns the response head.
    /// `affinity` is the client connection's slot, if it has one. It sets no timeout of its
    /// own: the caller bounds the exchange (`proxy::forward::exchange`, the route's `timeout`).
    pub async fn send(
        &self,
        route: &Route,
        affinity: Option<&Affinity>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pool = self.route_pool.get(route.index).copied().unwrap_or(0);
        loop {
            let reused = affinity.and_then(|a| a.take(pool)).or_else(|| self.pools.take(pool));
            let (mut sender, fresh) = match reused {
                Some(sender) => (sender, false),
                // Boxed: the connect state (TCP, TLS handshake) is large and rarely needed, and
                // every request's future would otherwise carry (and move) it.
                None => (Box::pin(self.connector.connect(self.pools.origin(pool))).await?, true),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    match affinity {
                        Some(affinity) => affinity.keep(pool, sender),
                        None => self.pools.put_when_ready(pool, sender),
                    }
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // Not written, on a reused connection (the keep-alive race): the next one.
                    Some(unsent) if !fresh => request = unsent,
                    // Not written, on a new connection: it failed before any request; final.
                    Some(_) => return Err(UpstreamError::Connect(err.into_error().into())),
                    None => return Err(UpstreamError::written(err.into_error())),
                },
            }
        }
    }
}

/// Each distinct origin (`scheme://authority/`) of `routes`, and each route's index in them.
fn origins(routes: &[Arc<Route>]) -> Result<(Vec<Uri>, Vec<usize>), ConfigError> {
    let mut origins: Vec<Uri> = Vec::new();
    let mut route_pool = Vec::with_capacity(routes.len());
    for route in routes {
        let origin = Uri::builder()
            .scheme(route.upstream.scheme.clone())
            .authority(route.upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "upstream.url".to_owned(),
                message: format!("route `{}`: {e}", route.name),
            })?;
        let index = match origins.iter().position(|o| *o == origin) {
            Some(index) => index,
            None => {
                origins.push(origin);
                origins.len() - 1
            }
        };
        route_pool.push(index);
    }
    Ok((origins, route_pool))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener as StdListener;

    use http_body_util::BodyExt;

    use super::test_support::{get, serve};
    use super::*;
    use crate::config::Config;

    /// The client for one route to `upstream_url`, and that route.
    fn client(upstream_url: &str) -> (Upstream, Arc<Route>) {
        let config = Config::from_toml(&format!("upstream.url = \"{upstream_url}\"")).expect("a valid config");
        let upstream = Upstream::new(&config.upstream, &config.routes).expect("the client");
        (upstream, config.routes[0].clone())
    }

    fn peer_port(response: &Response<Incoming>) -> String {
        response.headers()["x-peer"].to_str().expect("ascii").to_owned()
    }

    #[tokio::test]
    async fn a_client_connections_requests_reuse_one_upstream_connection() {
        let server = serve().await;
        let (upstream, route) = client(&format!("http://{}", server.addr));
        let affinity = upstream.affinity();

        let mut ports = Vec::new();
        for _ in 0..3 {
            let response = upstream.send(&route, Some(&affinity), get("/")).await;
            let response = response.expect("an answer");
            ports.push(peer_port(&response));
            response.into_body().collect().await.expect("the body");
        }
        assert!(ports.iter().all(|port| *port == ports[0]), "{ports:?}");
    }

    #[tokio::test]
    async fn without_a_slot_the_pooled_connection_is_reused() {
        let server = serve().await;
        let (upstream, route) = client(&format!("http://{}", server.addr));

        let mut ports = Vec::new();
        for _ in 0..2 {
            let response = upstream.send(&route, None, get("/")).await;
            let response = response.expect("an answer");
            ports.push(peer_port(&response));
            response.into_body().collect().await.expect("the body");
        }
        assert_eq!(ports[0], ports[1]);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_naming_its_cause() {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let (upstream, route) = client(&format!("http://127.0.0.1:{port}"));

        let err = upstream
            .send(&route, None, get("/"))
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
        let chain = crate::error::chain::Chain(&err).to_string();
        assert!(chain.starts_with("could not connect to the upstream: "), "{chain}");
        assert!(chain.len() > "could not connect to the upstream: ".len(), "{chain}");
    }

    #[tokio::test]
    async fn the_idle_reaper_ends_when_the_client_is_dropped() {
        let (upstream, _) = client("http://127.0.0.1:9");
        let affinity = upstream.affinity();
        let reaper = tokio::spawn(upstream.idle_reaper());
        drop(upstream);
        drop(affinity);
        tokio::time::timeout(std::time::Duration::from_secs(5), reaper)
            .await
            .expect("the reaper ends")
            .expect("the reaper does not panic");
    }
}
