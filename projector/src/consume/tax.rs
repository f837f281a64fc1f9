//! Interest payouts into tax records (B23), idempotent by `payout_id`.
//!
//! A tax record is written only with the figures of a payout the core
//! confirms: each event is checked against
//! `GET /v1/accounts/{id}/interest/payouts/{payout_id}` (payout id, account,
//! gross, tax, net, dates and time must all match). The broker takes
//! messages from anyone who can reach it, and the first record of a payout
//! id is the one kept; so an event published by something else (a payout
//! the core never made, or other figures for one it did) is dead-lettered
//! instead of standing as the tax record, even if it arrives first.
//!
//! A lost event (deleted from the stream, or dropped by the broker's
//! duplicate window because something else published first under its id)
//! would leave a payout without a record. [`sweep`] finds the history's
//! interest entries that have no tax record a while after they were written
//! and records the core's figures of those payouts.

use std::time::Duration;

use async_nats::jetstream::Message;
use chrono::{DateTime, Utc};
use common::events::{INTEREST_PAID_SUBJECT, InterestPaidEvent};
use common::shutdown::CancellationToken;
use common::{AccountId, PayoutId};
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use transfer::core_client::CoreError;
use transfer::history::sync::{self, SyncError};

use super::{Context, Failure, ack, fail, holding_progress};

/// Events checked against the core at once.
pub(crate) const CHECKS_IN_FLIGHT: usize = 8;
/// History entries the sweep looks back over, by when they were written.
const SWEEP_WINDOW_DAYS: i64 = 30;

/// Decodes and validates an interest event.
pub fn decode(subject: &str, payload: &[u8]) -> Result<InterestPaidEvent, String> {
    if subject != INTEREST_PAID_SUBJECT {
        return Err(format!("unexpected subject {subject}"));
    }
    let ev: InterestPaidEvent =
        serde_json::from_slice(payload).map_err(|e| format!("not an interest event: {e}"))?;
    if ev.gross.value() != ev.tax.value() + ev.net.value()
        || ev.tax.is_negative()
        || ev.net.is_negative()
    {
        return Err(format!(
            "inconsistent figures: gross {} tax {} net {}",
            ev.gross, ev.tax, ev.net
        ));
    }
    Ok(ev)
}

/// What [`record`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Records written by this call.
    pub new: u64,
    /// Payouts whose record holds other figures than the event's (the
    /// first record stands).
    pub differing: Vec<String>,
}

/// Records tax for the events (duplicates change nothing). A payout already
/// recorded with other figures keeps its first record (the record is not
/// rewritten behind an auditor's back), but is not passed over in silence:
/// it is logged and counted (`projector_tax_record_conflicts_total`, alert
/// `TaxRecordConflicts`).
///
/// Two statements, the second only when the first skipped an event: the
/// insert's own snapshot predates a record inserted concurrently (the insert
/// waits for that transaction and then skips the payout, but a comparison in
/// the same statement would not see the record), so the comparison is a
/// statement of its own, which sees every committed record.
pub async fn record(
    db: &DatabaseConnection,
    events: &[InterestPaidEvent],
) -> Result<Recorded, DbErr> {
    if events.is_empty() {
        return Ok(Recorded::default());
    }
    let ids: Vec<String> = events.iter().map(|e| e.payout_id.to_string()).collect();
    let accounts: Vec<String> = events.iter().map(|e| e.account_id.to_string()).collect();
    let gross: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.gross.value()).collect();
    let tax: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.tax.value()).collect();
    let net: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.net.value()).collect();
    let from: Vec<chrono::NaiveDate> = events.iter().map(|e| e.from).collect();
    let through: Vec<chrono::NaiveDate> = events.iter().map(|e| e.through).collect();
    let paid: Vec<chrono::DateTime<chrono::Utc>> = events.iter().map(|e| e.paid_at).collect();
    let values: Vec<sea_orm::Value> = vec![
        ids.into(),
        accounts.into(),
        gross.into(),
        tax.into(),
        net.into(),
        from.into(),
        through.into(),
        paid.into(),
    ];
    const INCOMING: &str = "incoming AS ( \
        SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::numeric[], $5::numeric[], \
                             $6::date[], $7::date[], $8::timestamptz[]) \
          AS i(payout_id, account_id, gross, tax, net, from_date, through_date, paid_at))";
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!(
                "WITH {INCOMING}, \
                 inserted AS ( \
                   INSERT INTO tax_records (payout_id, account_id, gross, tax, net, from_date, through_date, paid_at) \
                   SELECT * FROM incoming ON CONFLICT (payout_id) DO NOTHING RETURNING 1) \
                 SELECT count(*) AS new FROM inserted"
            ),
            values.clone(),
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("no answer from the tax record insert".into()))?;
    let new = u64::try_from(row.try_get::<i64>("", "new")?).unwrap_or(0);
    if new == events.len() as u64 {
        return Ok(Recorded {
            new,
            differing: Vec::new(),
        });
    }
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!(
                "WITH {INCOMING} \
                 SELECT coalesce(array_agg(DISTINCT i.payout_id), '{{}}') AS differing FROM incoming i \
                   JOIN tax_records t ON t.payout_id = i.payout_id \
                  WHERE (t.account_id, t.gross, t.tax, t.net, t.from_date, t.through_date, t.paid_at) \
                        IS DISTINCT FROM \
                        (i.account_id, i.gross, i.tax, i.net, i.from_date, i.through_date, i.paid_at)"
            ),
            values,
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("no answer from the tax record comparison".into()))?;
    let differing: Vec<String> = row.try_get("", "differing")?;
    if !differing.is_empty() {
        metrics::counter!("projector_tax_record_conflicts_total").increment(differing.len() as u64);
        tracing::error!(payout_ids = ?differing, "tax records already held other figures for these payouts; the first records stand, the core's figures were not written");
    }
    Ok(Recorded { new, differing })
}

/// What the core says about an interest event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The core made this payout, with these figures.
    Confirmed,
    /// The core made no such payout to the account, or other figures.
    NotTheCores(String),
}

/// Checks an event against the core's record of its payout (one call).
pub async fn check(ctx: &Context, ev: &InterestPaidEvent) -> Result<Check, CoreError> {
    Ok(
        match ctx.core.payout_of(&ev.account_id, &ev.payout_id).await? {
            None => Check::NotTheCores(format!(
                "the core made no payout {} to account {}",
                ev.payout_id, ev.account_id
            )),
            Some(p) => compare(ev, &p.into_event()),
        },
    )
}

/// An event against the event the core published for its payout: equal in
/// every field, the time to the microsecond (as the core stores it).
fn compare(ev: &InterestPaidEvent, cores: &InterestPaidEvent) -> Check {
    let micros = |e: &InterestPaidEvent| e.paid_at.timestamp_micros();
    let same = micros(ev) == micros(cores)
        && InterestPaidEvent {
            paid_at: cores.paid_at,
            ..ev.clone()
        } == *cores;
    if same {
        Check::Confirmed
    } else {
        Check::NotTheCores(format!(
            "the core's payout is {}; the event says {}",
            summary(cores),
            summary(ev)
        ))
    }
}

fn summary(e: &InterestPaidEvent) -> String {
    format!(
        "{} ({}) to {}: gross {} tax {} net {} for {}..{} at {}",
        e.payout_id, e.event_id, e.account_id, e.gross, e.tax, e.net, e.from, e.through, e.paid_at
    )
}

/// Handles a batch from the `INTEREST` consumer: decodes, checks each event
/// against the core, and records the confirmed ones. Returns the messages
/// left unsettled because the channel database is unavailable (see
/// [`super::run`], which holds them). If PostgreSQL refuses the data of some
/// event, the batch is recorded again one event at a time, so only that one
/// is dead-lettered.
pub async fn handle(ctx: &Context, batch: Vec<Message>) -> Vec<Message> {
    let mut valid = Vec::with_capacity(batch.len());
    for m in batch {
        match decode(m.subject.as_str(), &m.payload) {
            Ok(e) => valid.push((m, e)),
            Err(reason) => fail(ctx, &m, Failure::Permanent(reason)).await,
        }
    }
    // Checked against the core while the server is told the messages are
    // still being worked on: a slow core must not make them time out.
    let messages: Vec<&Message> = valid.iter().map(|(m, _)| m).collect();
    let checks: Vec<_> = valid.iter().map(|(_, ev)| check(ctx, ev)).collect();
    let outcomes: Vec<_> = holding_progress(
        ctx,
        &messages,
        futures::stream::iter(checks)
            .buffered(CHECKS_IN_FLIGHT)
            .collect::<Vec<_>>(),
    )
    .await;
    let mut confirmed = Vec::with_capacity(valid.len());
    for ((m, ev), outcome) in valid.into_iter().zip(outcomes) {
        match outcome {
            Ok(Check::Confirmed) => confirmed.push((m, ev)),
            Ok(Check::NotTheCores(reason)) => {
                metrics::counter!("projector_interest_events_not_the_cores_total").increment(1);
                tracing::warn!(payout_id = %ev.payout_id, account = %ev.account_id, %reason, "an interest event is not the core's; no tax record");
                fail(ctx, &m, Failure::Permanent(reason)).await;
            }
            Err(e) => {
                let reason = format!(
                    "the core cannot confirm the payout: {}",
                    common::error_chain(&e)
                );
                fail(ctx, &m, Failure::Transient(reason)).await;
            }
        }
    }
    record_settling(ctx, confirmed).await
}

/// Records confirmed events and settles their messages; returns those held
/// because the channel database is unavailable.
async fn record_settling(ctx: &Context, valid: Vec<(Message, InterestPaidEvent)>) -> Vec<Message> {
    if valid.is_empty() {
        return Vec::new();
    }
    let events: Vec<InterestPaidEvent> = valid.iter().map(|(_, e)| e.clone()).collect();
    match record(&ctx.db, &events).await {
        Ok(Recorded { new, .. }) => {
            metrics::counter!("projector_tax_records_total").increment(new);
            for (m, _) in &valid {
                ack(m).await;
            }
        }
        Err(e) if common::db::is_unavailable(&e) => {
            tracing::warn!(error = %e, held = valid.len(), "the channel database is unavailable; holding the tax records");
            return valid.into_iter().map(|(m, _)| m).collect();
        }
        Err(e) if common::db::is_rejected_data(&e) && valid.len() > 1 => {
            tracing::warn!(error = %e, events = valid.len(), "the channel database refused a tax record; recording them one at a time");
            let mut rest = valid.into_iter();
            while let Some((m, ev)) = rest.next() {
                match record(&ctx.db, std::slice::from_ref(&ev)).await {
                    Ok(Recorded { new, .. }) => {
                        metrics::counter!("projector_tax_records_total").increment(new);
                        ack(&m).await;
                    }
                    Err(e) if common::db::is_unavailable(&e) => {
                        return std::iter::once(m).chain(rest.map(|(m, _)| m)).collect();
                    }
                    Err(e) => fail(ctx, &m, Failure::of_database(&e)).await,
                }
            }
        }
        Err(e) => {
            let failure = Failure::of_database(&e);
            for (m, _) in &valid {
                fail(ctx, m, failure.clone()).await;
            }
        }
    }
    Vec::new()
}

/// Why a sweep pass, or one entry of it, failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The channel database failed.
    #[error("channel database")]
    Db(#[from] DbErr),
    /// The core could not be read.
    #[error("reading payouts from the core")]
    Core(#[from] CoreError),
    /// A history entry that is not the core's could not be repaired.
    #[error("repairing the history")]
    Repair(#[from] SyncError),
}

impl SweepError {
    /// True when the rest of the pass could not succeed either: the channel
    /// database failed, or the core did not answer. Otherwise only this
    /// entry is left for the next pass, and the others are still settled.
    fn stops_the_pass(&self) -> bool {
        match self {
            SweepError::Db(_) | SweepError::Repair(SyncError::Db(_)) => true,
            SweepError::Core(e) | SweepError::Repair(SyncError::Core(e)) => e.is_unreachable(),
        }
    }
}

/// A history entry as the sweep orders them: when it was written, its
/// account, its seq.
type EntryKey = (DateTime<Utc>, String, i64);

/// Most pages one pass reads: a pass that starts far behind (a process
/// whose sweep never caught up reads the whole window) goes on at the next
/// one.
const SWEEP_PAGES_PER_PASS: usize = 100;

/// Most entries kept for another try ([`SweepState`]).
const SWEEP_RETRY_MAX: usize = 10_000;

/// What the sweep knows between passes, so that a pass reads only the
/// entries written since the last one (and a margin), not the whole window:
/// at a bank's volume the window holds millions of interest entries, nearly
/// all recorded. What a restarted process needs of it is in the channel
/// database (`tax_sweep_progress`, see [`SweepState::settled_until`]).
#[derive(Debug, Default)]
pub struct SweepState {
    /// Whether `read_until` was taken from `tax_sweep_progress` (at the
    /// first pass that could read it).
    loaded: bool,
    /// Every entry written before this time (the young edge of the last
    /// pass that caught up) has been looked at: it has its record or it is
    /// in `retry`. `None`: nothing yet, start at the window's start.
    read_until: Option<DateTime<Utc>>,
    /// Where a scan cut short (pages per pass, or a failure) goes on, and
    /// the young edge it reads up to.
    resume: Option<(EntryKey, DateTime<Utc>)>,
    /// Entries that could not be settled yet, tried again at each pass in
    /// turn (oldest first, a failed one to the back).
    retry: std::collections::VecDeque<(EntryKey, String)>,
    /// More failing entries than `retry` keeps: the next scan starts at the
    /// window's start again.
    lost_track: bool,
}

impl SweepState {
    fn keep_for_retry(&mut self, key: EntryKey, payout: String) {
        if self.retry.iter().any(|(k, _)| *k == key) {
            return;
        }
        if self.retry.len() >= SWEEP_RETRY_MAX {
            self.lost_track = true;
            return;
        }
        self.retry.push_back((key, payout));
        metrics::gauge!("projector_tax_sweep_retrying").set(self.retry.len() as f64);
    }

    /// The time before which every interest entry is settled (recorded, or
    /// given up) as far as this process knows: `overlap` before where it has
    /// read up to (an entry stamped before that may still have been
    /// uncommitted then, and is read again by the next pass, not known to
    /// be settled), or the oldest entry it keeps for another try if that is
    /// earlier. The entries kept are in this process's memory only, so this
    /// is what another process may start from; being settled, it is also
    /// where any later time recorded by this or another replica may go.
    fn settled_until(&self, read_until: DateTime<Utc>, overlap: chrono::Duration) -> DateTime<Utc> {
        let read = read_until
            .checked_sub_signed(overlap)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        self.retry
            .iter()
            .map(|((written, _, _), _)| *written)
            .fold(read, DateTime::min)
    }
}

/// Where the sweep's processes have settled every interest entry up to
/// (`tax_sweep_progress`), if any has caught up yet.
async fn load_settled_until(db: &DatabaseConnection) -> Result<Option<DateTime<Utc>>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT swept_until FROM tax_sweep_progress",
        ))
        .await?;
    row.map(|r| r.try_get("", "swept_until")).transpose()
}

/// Records that every interest entry before `until` is settled. Replicas
/// each record their own: the latest time stands, as everything before any
/// replica's time is settled whichever replica settled it.
async fn store_settled_until(db: &DatabaseConnection, until: DateTime<Utc>) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO tax_sweep_progress (swept_until) VALUES ($1) \
         ON CONFLICT (id) DO UPDATE SET swept_until = GREATEST(tax_sweep_progress.swept_until, EXCLUDED.swept_until)",
        [until.into()],
    ))
    .await?;
    Ok(())
}

/// One sweep pass. First the entries kept from earlier passes (up to
/// `page`) are tried again. Then the history's interest entries written
/// since the last pass, from `overlap` before the time it read up to (a
/// transaction open then commits entries stamped with its start; a new
/// process's first pass: the time in `tax_sweep_progress`), up to
/// `min_age` ago and within [`SWEEP_WINDOW_DAYS`], are read in pages of
/// `page`; those without a tax record get the core's figures of their
/// payout recorded. An entry whose payout the core does not know is not the
/// core's: the history is repaired from the core's entries (B15). An entry
/// that cannot be settled (the core refuses or answers something
/// unexpected) is logged, counted and kept for the next pass, and the pass
/// goes on with the next one, so it cannot hold up the entries after it.
/// The pass stops at once when the core does not answer or the channel
/// database fails, and goes on from there at the next one. Returns how many
/// records were written.
pub async fn sweep_once(
    ctx: &Context,
    min_age: Duration,
    overlap: Duration,
    page: i64,
    state: &mut SweepState,
) -> Result<u64, SweepError> {
    metrics::counter!("projector_tax_sweep_passes_total").increment(1);
    if !state.loaded {
        // A process that starts goes on from where the sweep had settled
        // everything (the window's start if it never caught up).
        state.read_until = load_settled_until(&ctx.db).await?;
        state.loaded = true;
    }
    let mut recovered = retry_kept(ctx, page, state).await?;
    let overlap = chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::MAX);
    let (mut cursor, edge): (Option<EntryKey>, DateTime<Utc>) = match state.resume.take() {
        Some((cursor, edge)) => (Some(cursor), edge),
        None => {
            // The young edge, by the database's clock (it stamps the entries).
            let edge: DateTime<Utc> = ctx
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    ctx.db.get_database_backend(),
                    "SELECT now() - make_interval(secs => $1) AS edge",
                    [min_age.as_secs_f64().into()],
                ))
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("no time from the database".into()))?
                .try_get("", "edge")?;
            let from = state
                .read_until
                .and_then(|t| t.checked_sub_signed(overlap))
                .map(|from| (from, String::new(), 0));
            (from, edge)
        }
    };
    for _ in 0..SWEEP_PAGES_PER_PASS {
        let (after_time, after_account, after_seq) = match &cursor {
            Some((time, account, seq)) => (Some(*time), account.clone(), *seq),
            None => (None, String::new(), 0),
        };
        let rows = ctx
            .db
            .query_all_raw(Statement::from_sql_and_values(
                ctx.db.get_database_backend(),
                "SELECT h.account_id, h.payout_id, h.seq, h.applied_at, \
                        (t.payout_id IS NULL) AS unrecorded \
                 FROM history_entries h LEFT JOIN tax_records t ON t.payout_id = h.payout_id \
                 WHERE h.payout_id IS NOT NULL AND h.kind = 'interest' \
                   AND h.applied_at >= now() - make_interval(days => $1) \
                   AND h.applied_at < $2 \
                   AND ($4::timestamptz IS NULL OR (h.applied_at, h.account_id, h.seq) > ($4, $5, $6)) \
                 ORDER BY h.applied_at, h.account_id, h.seq LIMIT $3",
                [
                    (SWEEP_WINDOW_DAYS as i32).into(),
                    edge.into(),
                    page.into(),
                    after_time.into(),
                    after_account.into(),
                    after_seq.into(),
                ],
            ))
            .await
            .inspect_err(|_| state.resume = cursor.clone().map(|c| (c, edge)))?;
        let full = i64::try_from(rows.len()).is_ok_and(|n| n >= page);
        metrics::counter!("projector_tax_sweep_scanned_total").increment(rows.len() as u64);
        let mut unrecorded = Vec::new();
        let mut last = None;
        for r in rows {
            let key: EntryKey = (
                r.try_get("", "applied_at")?,
                r.try_get("", "account_id")?,
                r.try_get("", "seq")?,
            );
            if r.try_get::<bool>("", "unrecorded")? {
                unrecorded.push((key.clone(), r.try_get::<String>("", "payout_id")?));
            }
            last = Some(key);
        }
        if let Err(e) = settle_all(ctx, unrecorded, state, &mut recovered).await {
            // This page is read again from its start next time.
            state.resume = cursor.map(|c| (c, edge));
            return Err(e);
        }
        if let Some(last) = last {
            cursor = Some(last);
        }
        if !full {
            // Caught up with the young edge.
            state.read_until = if std::mem::take(&mut state.lost_track) {
                None
            } else {
                Some(edge)
            };
            // Not once track was lost: entries that could not be kept are
            // not settled, and the next pass starts at the window's start.
            if let Some(read_until) = state.read_until
                && let Err(e) =
                    store_settled_until(&ctx.db, state.settled_until(read_until, overlap)).await
            {
                tracing::warn!(error = %e, "recording how far the tax sweep has settled failed; a restarted projector sweeps from an earlier time");
            }
            return Ok(recovered);
        }
    }
    state.resume = cursor.map(|c| (c, edge));
    Ok(recovered)
}

/// Settles entries without a tax record a few at a time (as the consumer's
/// checks are); one that cannot be settled is kept in `state` for the next
/// pass. Stops at the first failure the rest could not get past either
/// (the core does not answer, the channel database failed) and returns it;
/// the entries not settled then are read again (or were kept) by the caller.
async fn settle_all(
    ctx: &Context,
    entries: Vec<(EntryKey, String)>,
    state: &mut SweepState,
    recovered: &mut u64,
) -> Result<(), SweepError> {
    let mut settled = futures::stream::iter(entries.into_iter().map(|(key, payout)| async move {
        let result = match (
            AccountId::parse(key.1.clone()),
            PayoutId::parse(payout.clone()),
        ) {
            (Ok(account), Ok(payout)) => Some(sweep_entry(ctx, &account, &payout, key.2).await),
            // Not ids this bank makes: nothing the core could explain.
            _ => None,
        };
        (key, payout, result)
    }))
    .buffered(CHECKS_IN_FLIGHT);
    while let Some((key, payout, result)) = settled.next().await {
        match result {
            None => {
                tracing::warn!(payout_id = %payout, account = %key.1, seq = key.2, "the tax sweep skips an interest entry whose ids are malformed");
            }
            Some(Ok(new)) => *recovered += new,
            Some(Err(e)) if e.stops_the_pass() => return Err(e),
            Some(Err(e)) => {
                metrics::counter!("projector_tax_sweep_errors_total").increment(1);
                tracing::warn!(payout_id = %payout, account = %key.1, seq = key.2, error = %common::error_chain(&e), "the tax sweep could not settle this interest entry; it is tried again at the next pass");
                state.keep_for_retry(key, payout);
            }
        }
    }
    Ok(())
}

/// Tries again up to `page` of the entries kept by earlier passes, oldest
/// first; drops those recorded meanwhile or past the window. When the pass
/// must stop, the ones not settled stay kept.
async fn retry_kept(ctx: &Context, page: i64, state: &mut SweepState) -> Result<u64, SweepError> {
    let oldest = Utc::now() - chrono::Duration::days(SWEEP_WINDOW_DAYS);
    let take = usize::try_from(page)
        .unwrap_or(usize::MAX)
        .min(state.retry.len());
    let (batch, expired): (Vec<(EntryKey, String)>, Vec<_>) = state
        .retry
        .drain(..take)
        .partition(|(key, _)| key.0 >= oldest);
    for ((written, account, seq), payout) in expired {
        metrics::counter!("projector_tax_sweep_given_up_total").increment(1);
        tracing::error!(payout_id = %payout, account = %account, seq, written = %written, "the tax sweep could not settle this interest entry for 30 days and no longer tries: its payout has no tax record (record it from the core's payout by hand, or replay its letter)");
    }
    let mut recovered = 0;
    if !batch.is_empty() {
        let payouts: Vec<String> = batch.iter().map(|(_, p)| p.clone()).collect();
        let recorded = match ctx
            .db
            .query_all_raw(Statement::from_sql_and_values(
                ctx.db.get_database_backend(),
                "SELECT payout_id FROM tax_records WHERE payout_id = ANY($1)",
                [payouts.into()],
            ))
            .await
        {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| r.try_get::<String>("", "payout_id").ok())
                .collect::<std::collections::HashSet<_>>(),
            Err(e) => {
                state.retry.extend(batch);
                return Err(e.into());
            }
        };
        let open: Vec<_> = batch
            .into_iter()
            .filter(|(_, p)| !recorded.contains(p))
            .collect();
        if let Err(e) = settle_all(ctx, open.clone(), state, &mut recovered).await {
            // Recorded ones are found recorded next time; none is lost.
            for (key, payout) in open {
                state.keep_for_retry(key, payout);
            }
            return Err(e);
        }
    }
    metrics::gauge!("projector_tax_sweep_retrying").set(state.retry.len() as f64);
    Ok(recovered)
}

/// Settles one interest entry without a tax record: records the core's
/// figures of its payout, or cuts the entry if it is not the core's.
/// Returns how many tax records it wrote.
async fn sweep_entry(
    ctx: &Context,
    account: &AccountId,
    payout: &PayoutId,
    seq: i64,
) -> Result<u64, SweepError> {
    match ctx.core.payout_of(account, payout).await? {
        Some(p) => {
            let new = record(&ctx.db, &[p.into_event()]).await?.new;
            if new > 0 {
                metrics::counter!("projector_tax_records_total").increment(new);
                metrics::counter!("projector_tax_records_recovered_total").increment(new);
                tracing::warn!(payout_id = %payout, account = %account, "a payout's interest event never arrived; its tax record was recorded from the core");
            }
            Ok(new)
        }
        None => {
            // Not the core's entry: checked against the core's entry at
            // that seq and cut back if so (B15).
            let check = sync::repair_unless_the_cores(&ctx.db, &ctx.core, account, seq).await?;
            tracing::warn!(payout_id = %payout, account = %account, seq, cut = check.cut, "the history held an interest entry for a payout the core does not know");
            if check.cut {
                // The core's entries from that seq on are fetched back now
                // (if this fails, the ledger audit finds the account behind).
                sync::sync_account(&ctx.db, &ctx.core, account).await?;
            }
            Ok(0)
        }
    }
}

/// Runs [`sweep_once`] every `every` until `shutdown`, reading pages of
/// `page` entries, each pass from `overlap` before where the last one ended,
/// looking at entries written at least `every` ago (by then their event has
/// normally been recorded).
pub async fn sweep(
    ctx: Context,
    every: Duration,
    overlap: Duration,
    page: i64,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = SweepState::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A pass can wait long on a core that does not answer: shutdown does
        // not wait for it (what it wrote is committed; the rest is read
        // again by the next process).
        let pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            pass = sweep_once(&ctx, every, overlap, page, &mut state) => pass,
        };
        if let Err(e) = pass {
            metrics::counter!("projector_tax_sweep_errors_total").increment(1);
            tracing::warn!(error = %common::error_chain(&e), "tax record sweep failed; retried at the next pass");
        }
    }
}
