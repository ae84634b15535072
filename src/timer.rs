//! Deadlines re-armed lazily: one tokio timer per client connection serves all of its
//! requests' deadlines (the header read, the upstream exchange), instead of a timer built,
//! inserted into tokio's wheel and removed for every request (about 500 instructions each, and
//! hyper's header timer is an aligned heap allocation too).
//!
//! The timer stays armed at an earlier deadline, which is sooner than the current one; when it
//! fires before the current deadline it is re-armed for it. On a busy keep-alive connection it
//! so fires about once per timeout (a spurious wake-up of the connection's task), and a request
//! touches the wheel only when its deadline is sooner than the armed one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// A timer kept across deadlines; empty until first used.
#[derive(Default)]
pub struct LazyTimer(Mutex<Option<Armed>>);

impl LazyTimer {
    /// The timer, locked (a panic elsewhere while it was held leaves it usable).
    pub fn lock(&self) -> MutexGuard<'_, Option<Armed>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A tokio timer and the waker it last registered: the task it wakes when it fires.
pub struct Armed {
    sleep: Pin<Box<Sleep>>,
    waker: Option<Waker>,
}

/// A timer armed at `deadline`, for a slot that had none.
pub fn armed(deadline: Instant) -> Armed {
    Armed {
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        waker: None,
    }
}

/// Polls `armed` for `deadline`: ready once it passed. Re-arms it for `deadline` when it is
/// armed later, or fired for an earlier deadline.
///
/// A timer armed no later than `deadline`, not fired, whose registered waker wakes this task,
/// is not polled again: it wakes the task when it fires, and polling it only registers the same
/// waker anew (about 120 instructions of tokio's, on every request of a keep-alive connection).
pub fn poll_deadline(armed: &mut Armed, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
    let sleep = &mut armed.sleep;
    if sleep.deadline() > deadline {
        sleep.as_mut().reset(deadline);
        armed.waker = None;
    } else if !sleep.is_elapsed() && armed.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        return Poll::Pending;
    }
    // Fired for an earlier deadline: re-armed once for this one, then it is this one's.
    for rearmed in [false, true] {
        match sleep.as_mut().poll(cx) {
            Poll::Pending => {
                if !armed.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    armed.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Poll::Ready(()) if rearmed || Instant::now() >= deadline => return Poll::Ready(()),
            Poll::Ready(()) => {
                sleep.as_mut().reset(deadline);
                armed.waker = None;
            }
        }
    }
    Poll::Ready(())
}

/// hyper's timer for one HTTP/1.1 connection (its header read timeout), on one [`LazyTimer`].
#[derive(Clone, Default)]
pub struct ConnectionTimer(Arc<LazyTimer>);

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline {
            timer: self.0.clone(),
            deadline: Instant::from_std(deadline),
        })
    }
}

/// One deadline on a connection's [`LazyTimer`]; dropping it leaves the timer armed.
struct Deadline {
    timer: Arc<LazyTimer>,
    deadline: Instant,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.timer.lock();
        let sleep = slot.get_or_insert_with(|| armed(self.deadline));
        poll_deadline(sleep, self.deadline, cx)
    }
}

impl hyper::rt::Sleep for Deadline {}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use hyper::rt::Timer;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Polls `sleep` once (arming the connection's timer for it), then drops it.
    async fn poll_once(sleep: Pin<Box<dyn hyper::rt::Sleep>>) {
        let mut sleep = sleep;
        poll_fn(|cx| {
            assert!(sleep.as_mut().poll(cx).is_pending(), "not due yet");
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_timer_armed_for_an_earlier_deadline_waits_for_the_current_one() {
        let timer = ConnectionTimer::default();
        let start = std::time::Instant::now();
        poll_once(timer.sleep_until(start + 50 * MS)).await;
        timer.sleep_until(start + 250 * MS).await;
        let elapsed = start.elapsed();
        assert!(elapsed >= 250 * MS, "fired for the abandoned deadline: {elapsed:?}");
        assert!(elapsed < 2000 * MS, "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_sooner_deadline_re_arms_the_timer() {
        let timer = ConnectionTimer::default();
        let start = std::time::Instant::now();
        poll_once(timer.sleep_until(start + 10_000 * MS)).await;
        timer.sleep_until(start + 100 * MS).await;
        let elapsed = start.elapsed();
        assert!(elapsed >= 100 * MS && elapsed < 2000 * MS, "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_timer_last_polled_by_another_task_wakes_the_one_polling_now() {
        let timer = ConnectionTimer::default();
        let start = std::time::Instant::now();
        // Armed and polled from a task of its own, which then ends: its waker is the one the
        // timer registered.
        tokio::spawn(poll_once(timer.sleep_until(start + 50 * MS)))
            .await
            .expect("the polling task");
        // This task is a different one: its deadline must still wake it.
        tokio::time::timeout(5000 * MS, timer.sleep_until(start + 100 * MS))
            .await
            .expect("woken at its deadline, not left waiting");
        assert!(start.elapsed() >= 100 * MS, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_passed_deadline_is_ready_at_once() {
        let timer = ConnectionTimer::default();
        let start = std::time::Instant::now();
        timer.sleep_until(start).await;
        assert!(start.elapsed() < 1000 * MS);
    }
}
