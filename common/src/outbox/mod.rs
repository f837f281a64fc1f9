//! The transactional outbox.
//!
//! A service that changes its database and must tell the world about it writes
//! the event into its own `outbox` table **in the same transaction** as the
//! change ([`enqueue`]). After commit, the [`relay`] publishes the rows to
//! JetStream with `Nats-Msg-Id` = `event_id` and marks them published. The
//! change and the event therefore commit or roll back together, and a crash
//! anywhere between commit and mark only causes a re-publish that JetStream's
//! duplicate window drops.

pub mod migrations;
pub mod relay;

use sea_orm::{ConnectionTrait, DbErr, Statement};

use crate::events::Event;
use crate::telemetry;

pub use relay::{Relay, RelayConfig, RelayWaker};

/// Name of the outbox table in each service's database.
pub const TABLE: &str = "outbox";
/// The PostgreSQL notification channel the relay listens on.
pub const NOTIFY_CHANNEL: &str = "outbox_inserted";

/// DDL for the outbox table, its indexes and the notify trigger. Each service
/// runs it from one of its own migrations, so each database gets its own
/// outbox. The statement-level trigger wakes relays (`LISTEN outbox_inserted`)
/// after commit without an extra round trip from the writer.
///
/// Sessions that set `bank.outbox_notify = off` skip the `NOTIFY`: the
/// services do (see [`crate::db::connect`]), because they wake their own relay
/// in-process after each commit ([`RelayWaker`]), and a `NOTIFY` at commit
/// serialises committing transactions on the notification queue -- measured
/// on this project's 2-core machine, it halved single-insert commit throughput
/// (12,900 to 5,700 tps). Any other writer (a script, another tool) still
/// wakes every relay through `NOTIFY`; replicas that did not write are covered
/// by the relay of the replica that did (each pass publishes every unpublished
/// row) and by the poll interval.
pub const CREATE_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS outbox (
    id           BIGSERIAL PRIMARY KEY,
    event_id     TEXT        NOT NULL,
    subject      TEXT        NOT NULL,
    payload      TEXT        NOT NULL,
    traceparent  TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_inserted', '');
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
"#;

/// Replaces the notify function with one honouring `bank.outbox_notify`
/// (run by a later migration of each service).
pub const NOTIFY_OPT_OUT_SQL: &str = r#"
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('bank.outbox_notify', true), '') <> 'off' THEN
        PERFORM pg_notify('outbox_inserted', '');
    END IF;
    RETURN NULL;
END $$;
"#;

/// Vacuums the outbox after a fixed number of dead rows rather than a share
/// of the table (run by a later migration of each service). Every published
/// row leaves a dead entry in `outbox_unpublished` that each relay pass walks
/// past until vacuum removes it; with the default share (20% of a table that
/// keeps a day of published rows) that could be hours of rows. Autovacuum
/// looks at each database every `autovacuum_naptime` (60 s by default), so
/// the bound is this threshold or a naptime of rows, whichever is larger.
pub const VACUUM_SETTINGS_SQL: &str = "ALTER TABLE outbox SET \
    (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000)";

/// Undoes [`VACUUM_SETTINGS_SQL`].
pub const VACUUM_SETTINGS_RESET_SQL: &str =
    "ALTER TABLE outbox RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)";

/// DDL that removes the outbox (for a migration's `down`).
pub const DROP_SQL: &str = "DROP TABLE IF EXISTS outbox; DROP FUNCTION IF EXISTS outbox_notify();";

/// One row to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// Deterministic id, sent as `Nats-Msg-Id`.
    pub event_id: String,
    /// Subject to publish on.
    pub subject: String,
    /// JSON body.
    pub payload: String,
    /// W3C trace context of the operation that produced the event.
    pub traceparent: Option<String>,
}

impl OutboxMessage {
    /// Its four columns, in the order of `INSERT INTO outbox (event_id,
    /// subject, payload, traceparent)`, as statement parameters.
    pub fn into_values(self) -> [sea_orm::Value; 4] {
        [
            self.event_id.into(),
            self.subject.into(),
            self.payload.into(),
            self.traceparent.into(),
        ]
    }

    /// Serializes an event, capturing the current span's trace context.
    pub fn from_event<E: Event>(event: &E) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: event.event_id().to_owned(),
            subject: event.subject(),
            payload: serde_json::to_string(event)?,
            traceparent: telemetry::current_traceparent(),
        })
    }
}

/// Writes messages into the outbox inside the caller's transaction, in one
/// statement. Rows are numbered in the order given, which is the order the
/// relay publishes them in.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    messages: &[OutboxMessage],
) -> Result<(), DbErr> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(messages.len());
    let mut subjects = Vec::with_capacity(messages.len());
    let mut payloads = Vec::with_capacity(messages.len());
    let mut traces = Vec::with_capacity(messages.len());
    for m in messages {
        ids.push(m.event_id.clone());
        subjects.push(m.subject.clone());
        payloads.push(m.payload.clone());
        traces.push(m.traceparent.clone().unwrap_or_default());
    }
    conn.execute_raw(Statement::from_sql_and_values(
        conn.get_database_backend(),
        "INSERT INTO outbox (event_id, subject, payload, traceparent) \
         SELECT e, s, p, NULLIF(t, '') \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS m(e, s, p, t, n) \
         ORDER BY n",
        [ids.into(), subjects.into(), payloads.into(), traces.into()],
    ))
    .await?;
    Ok(())
}
