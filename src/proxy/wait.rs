//! A request that waits for its key's first request instead of getting 409
//! (`on_conflict = "wait"`, docs/behaviour.md §5 and §15): woken when the key settles, never
//! polling the store.
//!
//! Its first look at the key (the `begin` that found it in flight) costs what every request
//! costs. Then it watches the key (registered in this process; with Redis, subscribed to the
//! key's channel) and looks once more, since the key may have settled before the watch began:
//! from then on it looks again only when woken, because the key settled (the owner completed
//! or released it) or because the subscription that would have said so was lost. Completed,
//! that look is the replay: two store commands besides the subscription. The wait ends at
//! `wait_timeout` (409) whatever happens, so a lost message never becomes a hang.

use std::time::Duration;

use tokio::time::Instant;

use crate::idempotency::StorageKey;
use crate::state::State;
use crate::store::waiters::Woken;
use crate::store::KeyWatch;

/// One request's wait. See the module documentation.
pub struct Waiter {
    deadline: Instant,
    watch: Option<KeyWatch>,
}

impl Waiter {
    /// A wait that ends `wait_timeout` from now; nothing is registered before it is needed.
    pub fn new(wait_timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + wait_timeout,
            watch: None,
        }
    }

    /// The key was found in flight: whether to look at it again (after watching it, or once
    /// woken), or give up (its deadline passed).
    pub async fn look_again(&mut self, state: &State, key: &StorageKey) -> bool {
        if Instant::now() >= self.deadline {
            state.metrics.wait().timed_out();
            return false;
        }
        let Some(watch) = &mut self.watch else {
            self.watch = Some(state.store.watch(key).await);
            return true;
        };
        match watch.wake(self.deadline).await {
            Woken::Settled => state.metrics.wait().woken_settled(),
            Woken::Lost => state.metrics.wait().woken_lost(),
            Woken::TimedOut => {
                state.metrics.wait().timed_out();
                return false;
            }
        }
        true
    }
}
