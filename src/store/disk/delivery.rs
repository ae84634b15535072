//! How the writer's answers reach the requests waiting for them (docs/behaviour.md §11.1): a
//! durable batch's answers are handed to the runtime at once, to one task of the store's that
//! completes each of them there.
//!
//! Why: a request woken from another thread costs the runtime a wake-up (on tokio's
//! current-thread runtime, a `write` to its event fd for every one; measured 1.94 per first
//! execution, one for its `InFlight` record and one for its result). Woken from a task of the
//! runtime instead, a request is queued locally, and a batch costs one wake-up however many
//! requests it answers. Without a runtime (the store opened outside one, or the runtime gone)
//! the writer answers each request itself.

use tokio::sync::mpsc;

use super::command::{Answer, Reply};
use crate::store::StoreError;

/// Answers, each with where it goes.
pub type Answers = Vec<(Reply, Result<Answer, StoreError>)>;

/// Hands the writer's answers to the requests waiting for them.
pub struct Delivery {
    /// The task that completes them, on the runtime the store was opened on.
    relay: Option<mpsc::UnboundedSender<Answers>>,
}

impl Delivery {
    /// Starts the relay task on the current runtime, if there is one.
    pub fn start() -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Self { relay: None };
        };
        let (relay, mut batches) = mpsc::unbounded_channel::<Answers>();
        runtime.spawn(async move {
            while let Some(answers) = batches.recv().await {
                complete(answers);
            }
        });
        Self { relay: Some(relay) }
    }

    /// Answers every request of `answers`: through the relay, or here if it is gone.
    pub fn deliver(&self, answers: Answers) {
        if answers.is_empty() {
            return;
        }
        let answers = match &self.relay {
            Some(relay) => match relay.send(answers) {
                Ok(()) => return,
                Err(mpsc::error::SendError(answers)) => answers,
            },
            None => answers,
        };
        complete(answers);
    }
}

fn complete(answers: Answers) {
    for (reply, answer) in answers {
        // The request may have gone (its client left); its write stands all the same.
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn one() -> (Answers, oneshot::Receiver<Result<Answer, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (vec![(reply, Ok(Answer::Done(true)))], answer)
    }

    #[tokio::test]
    async fn answers_reach_their_requests_through_the_runtime() {
        let delivery = Delivery::start();
        assert!(delivery.relay.is_some());
        let (answers, answer) = one();
        std::thread::spawn(move || delivery.deliver(answers))
            .join()
            .expect("the writer's thread");
        assert!(matches!(answer.await, Ok(Ok(Answer::Done(true)))));
    }

    #[test]
    fn without_a_runtime_the_writer_answers_itself() {
        let delivery = Delivery::start();
        assert!(delivery.relay.is_none());
        let (answers, mut answer) = one();
        delivery.deliver(answers);
        assert!(matches!(answer.try_recv(), Ok(Ok(Answer::Done(true)))));
    }

    #[test]
    fn when_the_runtime_is_gone_the_writer_answers_itself() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let delivery = runtime.block_on(async { Delivery::start() });
        drop(runtime);
        let (answers, mut answer) = one();
        delivery.deliver(answers);
        assert!(matches!(answer.try_recv(), Ok(Ok(Answer::Done(true)))));
    }
}
