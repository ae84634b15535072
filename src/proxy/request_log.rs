//! The request log line and the request metric (docs/behaviour.md §10.3), written exactly once
//! per request: by its handler when it answers, or, for an execution whose client went away
//! first, by whichever of the execution and the dropped handler comes last
//! ([`execution_line`]).

use std::mem;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use http::{Method, StatusCode};
use tracing::level_filters::LevelFilter;
use tracing::Level;

use crate::config::Route;
use crate::idempotency::ShortHash;
use crate::state::State;
use crate::telemetry::{Metrics, Outcome};

/// What the access log line says about one request, filled in as it is handled.
#[derive(Clone)]
pub struct RequestLog {
    pub route: Option<Arc<Route>>,
    pub key_hash: Option<ShortHash>,
    method: Method,
    /// When it arrived; read only when the line can be written (a clock read per request
    /// otherwise spent for nothing when `info` is filtered out).
    started: Option<Instant>,
}

impl RequestLog {
    /// The line of a request with `method`, arriving now.
    pub fn new(method: Method) -> Self {
        Self {
            route: None,
            key_hash: None,
            method,
            started: (LevelFilter::current() >= Level::INFO).then(Instant::now),
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("-", |r| &r.name)
    }

    /// Counts the request as `outcome` and writes its line. `client_gone`: the client left
    /// before it could be answered (the line then says `client_gone = true`).
    pub fn write(&self, metrics: &Metrics, status: StatusCode, outcome: Outcome, client_gone: bool) {
        metrics.request(self.route.as_ref().map(|r| r.index), &self.method, outcome);
        tracing::info!(
            route = self.route_name(),
            method = self.method.as_str(),
            status = status.as_u16(),
            outcome = outcome.as_str(),
            duration_ms = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0),
            key = self.key_hash.map(tracing::field::display),
            client_gone = client_gone.then_some(true),
            "request"
        );
    }
}

/// The two ends of an execution's line: the handler's, which answers the client, and the
/// execution task's, which learns the outcome. The execution runs on when its client leaves
/// (docs/behaviour.md §5.1), so its line must not depend on the handler, which hyper drops then.
pub fn execution_line(state: Arc<State>, log: &RequestLog) -> (ClientEnd, TaskEnd) {
    let shared = Arc::new(Shared {
        state,
        log: log.clone(),
        slot: Mutex::new(Slot::Running),
    });
    (ClientEnd(shared.clone()), TaskEnd(Some(shared)))
}

struct Shared {
    state: Arc<State>,
    log: RequestLog,
    slot: Mutex<Slot>,
}

/// What is known of an execution's line.
enum Slot {
    /// Neither its outcome nor its client's departure.
    Running,
    /// The client left: the execution writes the line when it ends.
    ClientGone,
    /// The execution ended: the handler writes the line, or its dropped end does.
    Ended { status: StatusCode, outcome: Outcome },
    /// Written, or the handler writes it.
    Done,
}

impl Shared {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_for_gone_client(&self, status: StatusCode, outcome: Outcome) {
        self.log.write(&self.state.metrics, status, outcome, true);
    }

    /// The execution ended with `status` and `outcome`.
    fn end(&self, status: StatusCode, outcome: Outcome) {
        let client_gone = {
            let mut slot = self.slot();
            match *slot {
                Slot::Running => {
                    *slot = Slot::Ended { status, outcome };
                    false
                }
                Slot::ClientGone => {
                    *slot = Slot::Done;
                    true
                }
                Slot::Ended { .. } | Slot::Done => false,
            }
        };
        if client_gone {
            self.write_for_gone_client(status, outcome);
        }
    }
}

/// The handler's end. Dropped before [`answered`](Self::answered), it means the client left.
pub struct ClientEnd(Arc<Shared>);

impl ClientEnd {
    /// The handler has the execution's result and writes the line itself.
    pub fn answered(self) {
        *self.0.slot() = Slot::Done;
    }
}

impl Drop for ClientEnd {
    fn drop(&mut self) {
        let ended = {
            let mut slot = self.0.slot();
            match mem::replace(&mut *slot, Slot::Done) {
                Slot::Running => {
                    *slot = Slot::ClientGone;
                    None
                }
                Slot::Ended { status, outcome } => Some((status, outcome)),
                Slot::ClientGone | Slot::Done => None,
            }
        };
        if let Some((status, outcome)) = ended {
            self.0.write_for_gone_client(status, outcome);
        }
    }
}

/// The execution task's end. Dropped before [`ended`](Self::ended) (the execution panicked,
/// or was cut off at shutdown), the execution ended as an internal error.
pub struct TaskEnd(Option<Arc<Shared>>);

impl TaskEnd {
    pub fn ended(mut self, status: StatusCode, outcome: Outcome) {
        if let Some(shared) = self.0.take() {
            shared.end(status, outcome);
        }
    }
}

impl Drop for TaskEnd {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.end(StatusCode::INTERNAL_SERVER_ERROR, Outcome::Internal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::telemetry::Exposition;

    /// On the memory store: these tests are about the log line, and a disk store would need a
    /// data directory (the default one would be left in the package root).
    async fn state() -> Arc<State> {
        let config =
            Config::from_toml("upstream.url = \"http://127.0.0.1:1\"\nstore.embedded = \"memory\"").expect("valid");
        Arc::new(State::new(config).await.expect("a state"))
    }

    fn keyed_post(state: &State) -> RequestLog {
        let mut log = RequestLog::new(Method::POST);
        log.route = Some(state.config.routes[0].clone());
        log
    }

    /// How many requests the metrics counted with `outcome`.
    fn counted(state: &State, outcome: &str) -> usize {
        let line = format!("route=\"default\",method=\"POST\",outcome=\"{outcome}\"}} ");
        let text = state.metrics.render(Exposition::Classic);
        text.lines()
            .find_map(|l| l.split_once(&line).and_then(|(_, n)| n.trim().parse().ok()))
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_client_that_leaves_first_leaves_the_line_to_the_execution() {
        let state = state().await;
        let (client, task) = execution_line(state.clone(), &keyed_post(&state));
        drop(client);
        assert_eq!(counted(&state, "executed"), 0, "not before the execution ends");
        task.ended(StatusCode::CREATED, Outcome::Executed);
        assert_eq!(counted(&state, "executed"), 1);
    }

    #[tokio::test]
    async fn a_client_that_leaves_after_the_end_writes_the_line_as_it_goes() {
        let state = state().await;
        let (client, task) = execution_line(state.clone(), &keyed_post(&state));
        task.ended(StatusCode::GATEWAY_TIMEOUT, Outcome::OutcomeUnknown);
        assert_eq!(counted(&state, "outcome_unknown"), 0, "the handler may still answer");
        drop(client);
        assert_eq!(counted(&state, "outcome_unknown"), 1);
    }

    #[tokio::test]
    async fn an_answering_handler_keeps_the_line_to_itself() {
        let state = state().await;
        let (client, task) = execution_line(state.clone(), &keyed_post(&state));
        task.ended(StatusCode::CREATED, Outcome::Executed);
        client.answered();
        assert_eq!(counted(&state, "executed"), 0, "the handler writes it");
    }

    #[tokio::test]
    async fn an_execution_dropped_unfinished_is_an_internal_error() {
        let state = state().await;
        let (client, task) = execution_line(state.clone(), &keyed_post(&state));
        drop(client);
        drop(task);
        assert_eq!(counted(&state, "internal_error"), 1);
    }
}
