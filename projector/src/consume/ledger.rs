//! Ledger events into the channel history (B14, B15).

use std::collections::{BTreeMap, HashMap};

use std::time::Instant;

use async_nats::jetstream::Message;
use common::AccountId;
use common::events::{EntryKind, LEDGER_SUBJECT_PREFIX, LedgerEntry, LedgerEvent};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sea_orm::DbErr;
use tokio::sync::oneshot;
use transfer::history::sync::{self, SyncError};
use transfer::history::writer;

use super::{Context, Failure, HandedBack, ack, fail, holding_progress, traceparent};

/// Pages of 1,000 entries fetched from the core per account and batch, so
/// that one large gap (a history restored from an old backup, an account
/// rebuilt) holds up the consumer for seconds, not minutes. A fill that
/// moved the history on but did not reach the event goes on with its next
/// delivery: the event is naked without the dead-letter check (see
/// [`settle`]). JetStream still counts those deliveries: past
/// `PROJECTOR_MAX_DELIVERIES` a transient failure of the event letters it as
/// usual, and past twice that it is handled alone (`consume::overdue::handle_alone`),
/// so a gap beyond about 800,000 entries goes on one delivery at a time.
const MAX_GAP_PAGES: usize = 50;

/// How soon an event whose gap fill moved on but is not done is delivered
/// again.
const FILLING_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Decodes and validates a ledger event.
pub fn decode(subject: &str, payload: &[u8]) -> Result<LedgerEntry, String> {
    let ev: LedgerEvent =
        serde_json::from_slice(payload).map_err(|e| format!("not a ledger event: {e}"))?;
    let expected = format!("{LEDGER_SUBJECT_PREFIX}{}", ev.entry.account_id);
    if subject != expected {
        return Err(format!(
            "event of account {} published on {subject}",
            ev.entry.account_id
        ));
    }
    if ev.entry.seq < 1 {
        return Err(format!("invalid seq {}", ev.entry.seq));
    }
    let amount = ev.entry.amount.value();
    let leaves = ev.entry.kind == EntryKind::TransferOut;
    if amount.is_zero() || amount.is_sign_negative() != leaves {
        return Err(format!(
            "amount {} cannot be a {} entry",
            ev.entry.amount,
            ev.entry.kind.as_str()
        ));
    }
    if ev.entry.balance_after.value().is_sign_negative() {
        return Err(format!(
            "balance_after {} is negative; the core never holds a negative balance",
            ev.entry.balance_after
        ));
    }
    if ev.entry.seq == 1 && ev.entry.balance_after != ev.entry.amount {
        return Err(format!(
            "seq 1 with amount {} leaves balance {}, not {}",
            ev.entry.amount, ev.entry.amount, ev.entry.balance_after
        ));
    }
    if ev.event_id != ev.entry.event_id() {
        return Err(format!(
            "event_id {} does not match {}",
            ev.event_id,
            ev.entry.event_id()
        ));
    }
    Ok(ev.entry)
}

/// Where each account's history stands after applying a batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `synced_through_seq` before the batch.
    pub before: BTreeMap<String, i64>,
    /// `synced_through_seq` after it.
    pub synced: BTreeMap<String, i64>,
    /// Why an account's remaining entries could not be applied.
    pub blocked: HashMap<String, String>,
    /// Entries that differ from the history's (the core's) entry at their seq.
    pub conflicts: Vec<LedgerEntry>,
    /// Entries that differ from the history's entry at their seq, where the
    /// core could not be asked which is right.
    pub waiting: Vec<LedgerEntry>,
}

impl Outcome {
    /// Whether the batch moved `e`'s account's history on (a gap fill
    /// applied entries), though maybe not as far as `e`.
    fn moved_on(&self, e: &LedgerEntry) -> bool {
        let account = e.account_id.as_str();
        matches!(
            (self.before.get(account), self.synced.get(account)),
            (Some(before), Some(after)) if after > before
        )
    }

    /// Records an event that differs from the core's entry at its seq (to be
    /// dead-lettered), counted and logged.
    fn conflict(&mut self, c: LedgerEntry) {
        metrics::counter!("projector_conflicting_events_total").increment(1);
        tracing::warn!(event_id = %c.event_id(), "an event differs from the core's entry at its seq");
        self.conflicts.push(c);
    }

    /// True when `entry` is in the history now.
    pub fn holds(&self, entry: &LedgerEntry) -> bool {
        self.synced
            .get(entry.account_id.as_str())
            .is_some_and(|s| entry.seq <= *s)
            && !self.conflicts(entry)
            && !self.waiting.contains(entry)
    }

    /// True when `entry` is not the core's entry at its seq.
    pub fn conflicts(&self, entry: &LedgerEntry) -> bool {
        self.conflicts.iter().any(|c| c == entry)
    }

    fn reason(&self, entry: &LedgerEntry) -> String {
        self.blocked
            .get(entry.account_id.as_str())
            .cloned()
            .unwrap_or_else(|| format!("waiting for entries before seq {}", entry.seq))
    }
}

/// Applies entries through the history writer; where an account has a gap,
/// fetches the missing range from the core's entries API, applies it, and
/// applies the entries again. Never writes past a gap it could not fill.
pub async fn apply_with_gap_fill(ctx: &Context, entries: &[LedgerEntry]) -> Result<Outcome, DbErr> {
    let report = writer::apply(&ctx.db, entries).await?;
    let mut outcome = Outcome {
        before: report.before.clone(),
        synced: report.synced.clone(),
        blocked: HashMap::new(),
        conflicts: report.conflicts.clone(),
        waiting: Vec::new(),
    };
    metrics::counter!("projector_events_applied_total").increment(report.applied);
    metrics::counter!("projector_duplicates_total").increment(report.duplicates);

    for gap in report.gaps {
        let account = gap.account_id.clone();
        let mut synced = gap.synced_through_seq;
        let target = entries
            .iter()
            .filter(|e| e.account_id == account)
            .map(|e| e.seq)
            .max()
            .unwrap_or(gap.first_blocked_seq);
        let started = Instant::now();
        let mut repaired = false;
        for _ in 0..MAX_GAP_PAGES {
            if synced >= target {
                break;
            }
            let page = match ctx.core.entries(&account, synced, 1000).await {
                Ok(p) => p,
                Err(e) => {
                    outcome.blocked.insert(
                        account.to_string(),
                        format!("filling the gap after seq {synced} from the core: {e}"),
                    );
                    break;
                }
            };
            if page.entries.is_empty() {
                outcome.blocked.insert(
                    account.to_string(),
                    format!(
                        "entry {target} is ahead of the core's ledger (last seq {})",
                        page.last_seq
                    ),
                );
                break;
            }
            let r = writer::apply(&ctx.db, &page.entries).await?;
            metrics::counter!("projector_gap_entries_filled_total").increment(r.applied);
            let now = r.synced.get(account.as_str()).copied().unwrap_or(synced);
            if now <= synced && synced > 0 && !repaired {
                // The core's next entry does not continue the history: the
                // last entry held may not be the core's.
                repaired = true;
                match sync::repair_unless_the_cores(&ctx.db, &ctx.core, &account, synced).await {
                    Ok(check) if check.cut => {
                        synced = writer::synced_through(&ctx.db, &account).await?;
                        continue;
                    }
                    Ok(_) => {}
                    Err(SyncError::Db(e)) => return Err(e),
                    Err(SyncError::Core(e)) => {
                        outcome.blocked.insert(
                            account.to_string(),
                            format!("checking the entry at seq {synced} with the core: {e}"),
                        );
                        break;
                    }
                }
            }
            if now <= synced {
                outcome.blocked.insert(
                    account.to_string(),
                    format!("the core's entries after {synced} do not continue the history"),
                );
                break;
            }
            synced = now;
        }
        // The batch's entries again: those within the filled range are now
        // checked against the core's (an entry that did not continue the
        // balances turns out a conflict), the rest applied if they continue.
        let (now, conflicts) = apply_again(ctx, entries, &account).await?;
        synced = now.unwrap_or(synced);
        outcome.conflicts.extend(conflicts);
        if gap.discontinuous && synced == gap.synced_through_seq {
            outcome.blocked.entry(account.to_string()).or_insert_with(|| {
                format!(
                    "entry {} does not continue the balance after seq {}; waiting for the core's entry",
                    gap.first_blocked_seq, gap.synced_through_seq
                )
            });
        }
        if synced > gap.synced_through_seq {
            tracing::info!(%account, from = gap.synced_through_seq + 1, through = synced, elapsed_ms = started.elapsed().as_millis() as u64, "filled a history gap from the core");
            metrics::counter!("projector_gaps_filled_total").increment(1);
        }
        outcome.synced.insert(account.to_string(), synced);
    }
    if !outcome.conflicts.is_empty() {
        settle_conflicts(ctx, entries, &mut outcome).await?;
    }
    Ok(outcome)
}

/// An entry that differs from the history's entry at its seq: one of the two
/// is not the core's, and the core decides. If the held one is not, the
/// history is cut back before that seq and fetched from the core again, and
/// the batch's entries of that account are checked once more against it (a
/// message that is the core's entry then holds; one that is not conflicts).
/// If the held one is the core's, the message stays a conflict
/// (dead-lettered). If the core cannot be asked, the message waits (a
/// transient failure).
async fn settle_conflicts(
    ctx: &Context,
    entries: &[LedgerEntry],
    outcome: &mut Outcome,
) -> Result<(), DbErr> {
    let mut conflicts = std::mem::take(&mut outcome.conflicts);
    conflicts.dedup();
    let mut repaired: Vec<AccountId> = Vec::new();
    for c in conflicts {
        if repaired.contains(&c.account_id) || outcome.conflicts.contains(&c) {
            continue;
        }
        match sync::repair_unless_the_cores(&ctx.db, &ctx.core, &c.account_id, c.seq).await {
            Ok(check) => {
                if check.cut
                    || check
                        .cores
                        .as_ref()
                        .is_some_and(|k| writer::same_values(k, &c))
                {
                    // The history is being put right (here or by another
                    // writer): fetch it again and check the batch's entries.
                    repaired.push(c.account_id.clone());
                } else {
                    outcome.conflict(c);
                }
            }
            Err(SyncError::Db(e)) => return Err(e),
            Err(SyncError::Core(e)) => {
                outcome.blocked.insert(
                    c.account_id.to_string(),
                    format!(
                        "entry {} differs from the history; asking the core: {e}",
                        c.event_id()
                    ),
                );
                outcome.waiting.push(c);
            }
        }
    }
    for account in repaired {
        let synced = match sync::sync_account(&ctx.db, &ctx.core, &account).await {
            Ok(r) => r.synced_through_seq,
            Err(SyncError::Db(e)) => return Err(e),
            Err(SyncError::Core(e)) => {
                outcome.blocked.insert(
                    account.to_string(),
                    format!("fetching the history again from the core: {e}"),
                );
                writer::synced_through(&ctx.db, &account).await?
            }
        };
        let (now, conflicts) = apply_again(ctx, entries, &account).await?;
        for c in conflicts {
            outcome.conflict(c);
        }
        // Where the history stands now, read under its lock by the apply:
        // another instance's repair may have cut it back since the sync, and
        // the sync's figure would then ack messages whose entries are gone.
        outcome
            .synced
            .insert(account.to_string(), now.unwrap_or(synced));
    }
    Ok(())
}

/// Applies the batch's entries of `account` again, after its history was
/// filled or repaired from the core: those now held are checked against the
/// core's entries (conflicts), the rest applied if they continue. Returns
/// where the history stands and the conflicts.
async fn apply_again(
    ctx: &Context,
    entries: &[LedgerEntry],
    account: &AccountId,
) -> Result<(Option<i64>, Vec<LedgerEntry>), DbErr> {
    let own: Vec<LedgerEntry> = entries
        .iter()
        .filter(|e| &e.account_id == account)
        .cloned()
        .collect();
    let r = writer::apply(&ctx.db, &own).await?;
    Ok((r.synced.get(account.as_str()).copied(), r.conflicts))
}

/// Handles a batch from the `LEDGER` consumer. Returns the messages left
/// unsettled because the channel database is unavailable (see
/// [`super::run`], which holds them); every other message is acked, naked or
/// dead-lettered. Each lane applies after the previous batch's same lane
/// has (`turns`).
pub async fn handle(ctx: &Context, batch: Vec<Message>, turns: Turns) -> Vec<Message> {
    let mut valid: Vec<(Message, LedgerEntry)> = Vec::with_capacity(batch.len());
    for m in batch {
        match decode(m.subject.as_str(), &m.payload) {
            Ok(e) => valid.push((m, e)),
            Err(reason) => fail(ctx, &m, Failure::Permanent(reason)).await,
        }
    }
    // Lanes: the batch is split by account into disjoint groups applied
    // concurrently, each in its own transaction. An account is always in the
    // same lane, and a lane applies only after the batch before is done with
    // it, so an account's entries keep their order within this instance;
    // the lanes never wait on each other's row locks.
    let mut lanes: Vec<Vec<(Message, LedgerEntry)>> = (0..LANES).map(|_| Vec::new()).collect();
    for (m, e) in valid {
        lanes[lane_of(e.account_id.as_str())].push((m, e));
    }
    let mut running: FuturesUnordered<_> = lanes
        .into_iter()
        .zip(turns.lanes)
        .map(|(l, turn)| handle_lane(ctx, l, turn))
        .collect();
    // What lanes hand back is held, in progress while the other lanes finish.
    let held = HandedBack::default();
    held.holding(ctx, async {
        while let Some(back) = running.next().await {
            held.extend(back);
        }
    })
    .await;
    held.into_inner()
}

/// Concurrent transactions per batch.
const LANES: usize = 4;

fn lane_of(account: &str) -> usize {
    (common::ids::stable_hash(account) % LANES as u64) as usize
}

/// The order in which consecutive batches take their turns in the lanes.
///
/// The consumer keeps two ledger batches in hand, so the next one is
/// decoded while this one is applied; a batch's lane waits until the batch
/// handed out before it is done with that lane. An account always falls
/// into the same lane, so its entries are applied in the order they were
/// delivered, as with one batch at a time. A lane the channel database could
/// not take is handed back whole (its messages held, [`super::run`]), and so
/// is the same lane of every batch after it that is in hand, so held earlier
/// entries are not overtaken by later ones. Once no batch is in hand (and
/// what was held has been handled), the consumer starts a new order.
#[derive(Debug, Default)]
pub struct LaneOrder {
    /// Per lane: resolves once the last batch handed a turn is done with it.
    last: [Option<oneshot::Receiver<Passed>>; LANES],
}

impl LaneOrder {
    /// The turns of the next batch, after every batch handed out before.
    pub fn take_turns(&mut self) -> Turns {
        let lanes = self
            .last
            .iter_mut()
            .map(|last| {
                let (next, after_this) = oneshot::channel();
                Turn {
                    after: last.replace(after_this),
                    next: Some(next),
                }
            })
            .collect();
        Turns { lanes }
    }
}

/// A batch's turn in every lane (see [`LaneOrder`]).
#[derive(Debug)]
pub struct Turns {
    lanes: Vec<Turn>,
}

impl Turns {
    /// Turns that wait for nothing: for a batch with no other in hand.
    pub fn free() -> Self {
        LaneOrder::default().take_turns()
    }
}

/// How a batch left a lane to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passed {
    /// Applied or settled: the next batch applies the lane.
    Settled,
    /// Handed back unsettled (the database is away): the next batch hands
    /// the lane back too.
    Held,
}

/// A batch's turn in one lane: it may apply once the batch before is done
/// with the lane ([`Turn::wait`]), and passes the lane on when done
/// ([`Turn::pass`]; dropped after its wait, as settled; dropped before, as
/// the batch before passes it).
#[derive(Debug)]
struct Turn {
    after: Option<oneshot::Receiver<Passed>>,
    next: Option<oneshot::Sender<Passed>>,
}

impl Turn {
    /// Waits for the batch before to be done with this lane; how it left
    /// it (a batch that ended without saying, its task failed, as settled).
    /// Cancel-safe: dropped before then, the turn still waits.
    async fn wait(&mut self) -> Passed {
        let Some(after) = self.after.as_mut() else {
            return Passed::Settled;
        };
        let passed = after.await.unwrap_or(Passed::Settled);
        self.after = None;
        passed
    }

    /// Passes the lane to the next batch.
    fn pass(mut self, how: Passed) {
        if let Some(next) = self.next.take() {
            let _ = next.send(how);
        }
    }
}

impl Drop for Turn {
    /// A turn dropped before the batch before it was done (its batch's task
    /// ended early) passes the lane on only once that batch is done, so the
    /// next batch never applies beside it.
    fn drop(&mut self) {
        let (Some(after), Some(next)) = (self.after.take(), self.next.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let passed = after.await.unwrap_or(Passed::Settled);
                let _ = next.send(passed);
            });
        }
    }
}

/// Applies one lane in one transaction, in its turn. If PostgreSQL refuses
/// the data of some entry, the lane is applied again one entry at a time, so
/// only that entry is dead-lettered and the rest of the lane goes on.
async fn handle_lane(
    ctx: &Context,
    valid: Vec<(Message, LedgerEntry)>,
    mut turn: Turn,
) -> Vec<Message> {
    // The server is told the messages are in progress while the batch
    // before is still applying this lane (a long gap fill, for example).
    let before = {
        let messages: Vec<&Message> = valid.iter().map(|(m, _)| m).collect();
        holding_progress(ctx, &messages, turn.wait()).await
    };
    if before == Passed::Held {
        // The batch before handed this lane back: these entries are held
        // with its, and applied after them once the database answers.
        turn.pass(Passed::Held);
        return valid.into_iter().map(|(m, _)| m).collect();
    }
    if valid.is_empty() {
        return Vec::new();
    }
    let entries: Vec<LedgerEntry> = valid.iter().map(|(_, e)| e.clone()).collect();
    match apply_holding_progress(ctx, &valid, &entries).await {
        Ok(outcome) => {
            // Applied: the next batch may apply this lane while the
            // messages are acknowledged.
            turn.pass(Passed::Settled);
            settle(ctx, &valid, &outcome).await;
            Vec::new()
        }
        Err(e) if common::db::is_unavailable(&e) => {
            tracing::warn!(error = %e, held = valid.len(), "the channel database is unavailable; holding the lane");
            turn.pass(Passed::Held);
            valid.into_iter().map(|(m, _)| m).collect()
        }
        Err(e) if common::db::is_rejected_data(&e) && valid.len() > 1 => {
            tracing::warn!(error = %e, entries = valid.len(), "the channel database refused an entry of the lane; applying its entries one at a time");
            let mut rest = valid.into_iter();
            while let Some((m, entry)) = rest.next() {
                let one = [(m, entry)];
                let entries = [one[0].1.clone()];
                match apply_holding_progress(ctx, &one, &entries).await {
                    Ok(outcome) => settle(ctx, &one, &outcome).await,
                    Err(e) if common::db::is_unavailable(&e) => {
                        turn.pass(Passed::Held);
                        let [(m, _)] = one;
                        return std::iter::once(m).chain(rest.map(|(m, _)| m)).collect();
                    }
                    Err(e) => fail(ctx, &one[0].0, Failure::of_database(&e)).await,
                }
            }
            Vec::new()
        }
        Err(e) => {
            let failure = Failure::of_database(&e);
            tracing::warn!(error = %e, "applying a ledger batch failed");
            for (m, _) in &valid {
                fail(ctx, m, failure.clone()).await;
            }
            Vec::new()
        }
    }
}

/// [`apply_with_gap_fill`], telling the server regularly that the messages
/// are still being worked on, so a long gap fill does not let them time out.
async fn apply_holding_progress(
    ctx: &Context,
    valid: &[(Message, LedgerEntry)],
    entries: &[LedgerEntry],
) -> Result<Outcome, DbErr> {
    let messages: Vec<&Message> = valid.iter().map(|(m, _)| m).collect();
    holding_progress(ctx, &messages, apply_with_gap_fill(ctx, entries)).await
}

/// Acks what the history now holds; naks the rest with the reason.
async fn settle(ctx: &Context, valid: &[(Message, LedgerEntry)], outcome: &Outcome) {
    let now = chrono::Utc::now();
    for (m, e) in valid {
        if outcome.conflicts(e) {
            fail(
                ctx,
                m,
                Failure::Permanent(format!(
                    "entry {} differs from the core's ledger at that seq",
                    e.event_id()
                )),
            )
            .await;
        } else if outcome.holds(e) {
            let span = tracing::info_span!(
                "projector.apply",
                otel.kind = "consumer",
                otel.name = %format!("apply {}", m.subject),
                messaging.message_id = %e.event_id(),
            );
            common::telemetry::set_remote_parent(&span, traceparent(m).as_deref());
            let _entered = span.enter();
            if outcome
                .before
                .get(e.account_id.as_str())
                .is_none_or(|b| e.seq > *b)
            {
                let lag = (now - e.occurred_at)
                    .to_std()
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics::histogram!("projector_lag_seconds").record(lag);
            }
            drop(_entered);
            ack(m).await;
        } else if outcome.moved_on(e) && !outcome.blocked.contains_key(e.account_id.as_str()) {
            // A gap fill that moved the history on and stopped at its page
            // budget: not a failure, so not counted towards the dead letter.
            if let Err(err) = m
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                    FILLING_AGAIN_AFTER,
                )))
                .await
            {
                tracing::warn!(error = %err, "nak failed; the message will be redelivered after ack_wait");
            }
        } else {
            fail(ctx, m, Failure::Transient(outcome.reason(e))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LANES, LaneOrder, Passed, Turn, Turns, decode};
    use futures::FutureExt;
    use serde_json::{Value, json};

    fn turns(order: &mut LaneOrder) -> Vec<Option<Turn>> {
        order.take_turns().lanes.into_iter().map(Some).collect()
    }

    fn pass(turn: &mut Option<Turn>, how: Passed) {
        if let Some(t) = turn.take() {
            t.pass(how);
        }
    }

    /// How the batch before left the lane, if it is done with it.
    fn passed(turn: &mut Option<Turn>) -> Option<Passed> {
        turn.as_mut().and_then(|t| t.wait().now_or_never())
    }

    #[tokio::test]
    async fn b14_a_batch_applies_a_lane_only_after_the_batch_before_is_done_with_it() {
        let mut order = LaneOrder::default();
        let mut first = turns(&mut order);
        let mut second = turns(&mut order);
        let mut third = turns(&mut order);
        // The first batch waits for nothing; the second waits in every lane.
        for lane in 0..LANES {
            assert_eq!(passed(&mut first[lane]), Some(Passed::Settled));
            assert_eq!(passed(&mut second[lane]), None);
        }
        // The first batch is done with lane 0: the second may apply it, the
        // third waits for the second.
        pass(&mut first[0], Passed::Settled);
        assert_eq!(passed(&mut second[0]), Some(Passed::Settled));
        assert_eq!(passed(&mut third[0]), None);
        // A lane handed back is handed back by the batches after it too.
        pass(&mut first[1], Passed::Held);
        assert_eq!(passed(&mut second[1]), Some(Passed::Held));
        pass(&mut second[1], Passed::Held);
        assert_eq!(passed(&mut third[1]), Some(Passed::Held));
        // The second batch ends early (its task failed) while the first still
        // applies lanes 2 and 3: the third may apply lane 0, which the second
        // was done with, and still waits for the first in lanes 2 and 3.
        drop(second);
        assert_eq!(passed(&mut third[0]), Some(Passed::Settled));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(passed(&mut third[2]), None);
        assert_eq!(passed(&mut third[3]), None);
        pass(&mut first[2], Passed::Settled);
        drop(first);
        for lane in [2, 3] {
            let turn = third[lane].as_mut();
            assert!(turn.is_some(), "lane {lane} has a turn");
            if let Some(turn) = turn {
                let passed =
                    tokio::time::timeout(std::time::Duration::from_secs(10), turn.wait()).await;
                assert_eq!(passed, Ok(Passed::Settled), "lane {lane}");
            }
        }
        // A batch handled alone waits for nothing.
        let mut free: Vec<Option<Turn>> = Turns::free().lanes.into_iter().map(Some).collect();
        assert_eq!(passed(&mut free[0]), Some(Passed::Settled));
    }

    const ACCOUNT: &str = "acc_01a23a50080676da9ced6504fc06d3cc";

    fn event(seq: i64, kind: &str, amount: &str, balance_after: &str) -> Vec<u8> {
        let v: Value = json!({
            "event_id": format!("{ACCOUNT}:{seq}"),
            "account_id": ACCOUNT,
            "seq": seq,
            "kind": kind,
            "amount": amount,
            "balance_after": balance_after,
            "occurred_at": "2026-12-03T00:00:00Z",
            "business_date": "2026-12-03",
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn check(seq: i64, kind: &str, amount: &str, balance_after: &str) -> Result<(), String> {
        decode(
            &format!("bank.ledger.{ACCOUNT}"),
            &event(seq, kind, amount, balance_after),
        )
        .map(|_| ())
    }

    #[test]
    fn b15_an_entry_whose_amount_cannot_be_its_kind_is_refused() {
        assert_eq!(check(2, "deposit", "100", "300"), Ok(()));
        assert_eq!(check(2, "transfer_out", "-100", "300"), Ok(()));
        for (kind, amount) in [
            ("deposit", "-100"),
            ("transfer_in", "-1"),
            ("interest", "0"),
            ("transfer_out", "100"),
            ("transfer_out", "0"),
        ] {
            let r = check(2, kind, amount, "300");
            assert!(
                r.as_ref().is_err_and(|e| e.contains("cannot be")),
                "{kind} {amount}: {r:?}"
            );
        }
    }

    #[test]
    fn b15_a_first_entry_must_leave_its_amount_as_the_balance() {
        assert_eq!(check(1, "deposit", "100", "100"), Ok(()));
        let r = check(1, "deposit", "100", "1000");
        assert!(r.as_ref().is_err_and(|e| e.contains("seq 1")), "{r:?}");
    }

    #[test]
    fn b15_an_entry_leaving_a_negative_balance_is_refused() {
        assert_eq!(check(2, "transfer_out", "-100", "0"), Ok(()));
        for (seq, amount, balance_after) in [(1, "-100", "-100"), (2, "-100", "-1")] {
            let r = check(seq, "transfer_out", amount, balance_after);
            assert!(
                r.as_ref().is_err_and(|e| e.contains("negative")),
                "seq {seq} {amount} -> {balance_after}: {r:?}"
            );
        }
    }
}
