//! What the disk store sends its writer thread (docs/behaviour.md §11.1): one write and where
//! its answer goes, and the answer, sent once the write is durable. Shared by the store, the
//! writer and the delivery of its answers.

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::UnknownOutcome;
use crate::idempotency::{LeaseToken, Print};
use crate::store::{Begin, StoreError};

/// An arriving request that the writer decides (no record, or its owner's lease lapsed).
pub struct Claim {
    pub key: [u8; 32],
    pub print: Print,
    pub token: LeaseToken,
    pub unknown_outcome: UnknownOutcome,
    pub now_ms: u64,
    pub expires_at_ms: u64,
    /// The encoded InFlight record this request would own the key with.
    pub in_flight: Bytes,
    /// The encoded Unknown(LeaseLapsed) record, for `unknown_outcome = reject`.
    pub lapsed: Bytes,
}

/// One write.
pub enum Op {
    Begin(Box<Claim>),
    Complete {
        key: [u8; 32],
        token: LeaseToken,
        record: Bytes,
    },
    Release {
        key: [u8; 32],
        token: LeaseToken,
    },
    Renew {
        key: [u8; 32],
        token: LeaseToken,
        lease_until_ms: u64,
    },
    Clear {
        key: [u8; 32],
    },
}

/// The writer's answer to one write, sent once it is durable.
pub enum Answer {
    Begun(Begin<LeaseToken>),
    Done(bool),
}

/// Where a write's answer goes.
pub type Reply = oneshot::Sender<Result<Answer, StoreError>>;

/// A write and where its answer goes.
pub struct Command {
    pub op: Op,
    pub reply: Reply,
}

/// What the writer thread waits for.
pub enum Msg {
    Write(Command),
    /// The store is closing: write and answer what came before, and stop.
    Stop,
}
