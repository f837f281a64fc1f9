//! Integration and end-to-end tests. Test names carry the numbers of
//! `SPEC.md` (`b07_...`, `f3_...`). Every test runs against real PostgreSQL,
//! Redis and a nats-server of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod core_interest;
mod core_ledger;
mod history;
mod operations;
mod outbox_relay;
mod projector;
mod transfer_flow;
