//! The event contract on NATS JetStream (API.md, "Events on NATS JetStream").
//!
//! Field names here are the wire format that outside JetStream clients depend
//! on; the JSON fixtures in `common/fixtures/` are their documentation and are
//! round-tripped by the tests below. Add fields only as optional ones.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, DepositId, PayoutId, TransferId};
use crate::money::{Amount, Won};

/// Subject prefix of ledger events; the account id is the last token.
pub const LEDGER_SUBJECT_PREFIX: &str = "bank.ledger.";
/// Subject of transfer events with the given status word.
pub const TRANSFER_SUBJECT_PREFIX: &str = "bank.transfer.";
/// Subject of interest payouts.
pub const INTEREST_PAID_SUBJECT: &str = "bank.interest.paid";
/// Subject of interest shadow-verification mismatches.
pub const INTEREST_MISMATCH_SUBJECT: &str = "bank.alert.interest_mismatch";
/// Prefix under which dead letters are stored, followed by the original subject.
pub const DLQ_SUBJECT_PREFIX: &str = "bank.dlq.";

/// Anything published through an outbox.
pub trait Event: Serialize {
    /// The deterministic id, also sent as `Nats-Msg-Id`.
    fn event_id(&self) -> &str;
    /// The NATS subject to publish on.
    fn subject(&self) -> String;
}

/// What kind of movement a ledger entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Money leaving the account to another account of this bank.
    TransferOut,
    /// Money arriving from another account of this bank.
    TransferIn,
    /// Money arriving from another bank.
    Deposit,
    /// Interest credited by a payout.
    Interest,
}

impl EntryKind {
    /// The wire and database name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::TransferOut => "transfer_out",
            EntryKind::TransferIn => "transfer_in",
            EntryKind::Deposit => "deposit",
            EntryKind::Interest => "interest",
        }
    }

    /// Parses the database name of the kind.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "transfer_out" => EntryKind::TransferOut,
            "transfer_in" => EntryKind::TransferIn,
            "deposit" => EntryKind::Deposit,
            "interest" => EntryKind::Interest,
            _ => return None,
        })
    }
}

/// One ledger entry: a change of one account's balance, numbered by the
/// account's gap-free sequence. Served by the core's entries API, stored in the
/// channel history, and (with an `event_id`) published on `LEDGER`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The account whose balance changed.
    pub account_id: AccountId,
    /// The account's sequence number of this entry (1, 2, 3, ...).
    pub seq: i64,
    /// What caused the change.
    pub kind: EntryKind,
    /// Signed amount: negative for money leaving.
    pub amount: Won,
    /// The balance after this entry.
    pub balance_after: Won,
    /// When the core committed the entry.
    pub occurred_at: DateTime<Utc>,
    /// The business date of the entry (Asia/Seoul by default).
    pub business_date: NaiveDate,
    /// The transfer that caused the entry, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<TransferId>,
    /// The inbound deposit that caused the entry, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposit_id: Option<DepositId>,
    /// The interest payout that caused the entry, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout_id: Option<PayoutId>,
    /// The other side: an account id for transfers, the sender for deposits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
    /// Free text given by the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
}

impl LedgerEntry {
    /// The deterministic event id of this entry: `<account_id>:<seq>`.
    pub fn event_id(&self) -> String {
        format!("{}:{}", self.account_id, self.seq)
    }
}

/// A ledger entry as published on `bank.ledger.<account_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEvent {
    /// `<account_id>:<seq>`.
    pub event_id: String,
    /// The entry itself.
    #[serde(flatten)]
    pub entry: LedgerEntry,
}

impl From<LedgerEntry> for LedgerEvent {
    fn from(entry: LedgerEntry) -> Self {
        Self {
            event_id: entry.event_id(),
            entry,
        }
    }
}

impl Event for LedgerEvent {
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn subject(&self) -> String {
        format!("{LEDGER_SUBJECT_PREFIX}{}", self.entry.account_id)
    }
}

/// Status of a transfer as the channel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Stored, the core's result not known yet.
    Pending,
    /// The core executed it.
    Succeeded,
    /// The core refused it or never received it.
    Failed,
}

impl TransferStatus {
    /// The wire and database name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Pending => "pending",
            TransferStatus::Succeeded => "succeeded",
            TransferStatus::Failed => "failed",
        }
    }

    /// Parses the database name of the status.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => TransferStatus::Pending,
            "succeeded" => TransferStatus::Succeeded,
            "failed" => TransferStatus::Failed,
            _ => return None,
        })
    }
}

/// `bank.transfer.requested` (status `pending`), `.succeeded` and `.failed`,
/// published by the transfer service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferEvent {
    /// `<transfer_id>:requested|succeeded|failed`.
    pub event_id: String,
    /// The transfer.
    pub transfer_id: TransferId,
    /// Source account.
    pub from_account: AccountId,
    /// Target account.
    pub to_account: AccountId,
    /// Amount moved (or to be moved).
    pub amount: Amount,
    /// The status this event announces.
    pub status: TransferStatus,
    /// Refusal code when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the status was reached.
    pub occurred_at: DateTime<Utc>,
}

impl TransferEvent {
    /// The event word of a status: `requested` for a new (pending)
    /// transfer, else the status itself.
    pub fn word(status: TransferStatus) -> &'static str {
        match status {
            TransferStatus::Pending => "requested",
            TransferStatus::Succeeded => "succeeded",
            TransferStatus::Failed => "failed",
        }
    }

    /// The deterministic event id for a transfer reaching a status:
    /// `<transfer_id>:requested|succeeded|failed`.
    pub fn id_for(transfer_id: &TransferId, status: TransferStatus) -> String {
        format!("{transfer_id}:{}", Self::word(status))
    }
}

impl Event for TransferEvent {
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn subject(&self) -> String {
        format!("{TRANSFER_SUBJECT_PREFIX}{}", Self::word(self.status))
    }
}

/// `bank.interest.paid`: a payout happened; the projector records its tax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestPaidEvent {
    /// `interest:<payout_id>`.
    pub event_id: String,
    /// The payout.
    pub payout_id: PayoutId,
    /// The credited account.
    pub account_id: AccountId,
    /// Interest before tax.
    pub gross: Won,
    /// Withholding tax.
    pub tax: Won,
    /// Credited amount, `gross - tax`.
    pub net: Won,
    /// First business date covered.
    pub from: NaiveDate,
    /// Last business date covered.
    pub through: NaiveDate,
    /// When the payout committed.
    pub paid_at: DateTime<Utc>,
}

impl InterestPaidEvent {
    /// The deterministic event id of a payout.
    pub fn id_for(payout_id: &PayoutId) -> String {
        format!("interest:{payout_id}")
    }
}

impl Event for InterestPaidEvent {
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn subject(&self) -> String {
        INTEREST_PAID_SUBJECT.to_owned()
    }
}

/// `bank.alert.interest_mismatch`: shadow verification found the legacy and
/// new interest calculations disagreeing for an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestMismatchEvent {
    /// `mismatch:<account_id>:<as_of>:<legacy>:<new>`.
    pub event_id: String,
    /// The account.
    pub account_id: AccountId,
    /// Gross interest by the legacy path.
    pub legacy: Won,
    /// Gross interest by the new path.
    pub new: Won,
    /// The business date of the comparison.
    pub as_of: NaiveDate,
}

impl Event for InterestMismatchEvent {
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn subject(&self) -> String {
        INTEREST_MISMATCH_SUBJECT.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn round_trip<T: Serialize + DeserializeOwned + Event>(fixture: &str, subject: &str) {
        let text =
            std::fs::read_to_string(format!("{}/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        let event: T = serde_json::from_value(original.clone()).unwrap();
        assert_eq!(event.subject(), subject, "{fixture}");
        let back = serde_json::to_value(&event).unwrap();
        assert_eq!(back, original, "{fixture} must round-trip exactly");
        assert_eq!(Some(event.event_id()), original["event_id"].as_str());
    }

    #[test]
    fn fixtures_round_trip() {
        round_trip::<LedgerEvent>(
            "ledger_entry.transfer_out.json",
            "bank.ledger.acc_0192a1b2c3d4e5f6a7b8c9d0e1f2a3b4",
        );
        round_trip::<LedgerEvent>(
            "ledger_entry.deposit.json",
            "bank.ledger.acc_0192a1b2c3d4e5f6a7b8c9d0e1f2a3b4",
        );
        round_trip::<TransferEvent>("transfer.requested.json", "bank.transfer.requested");
        round_trip::<TransferEvent>("transfer.succeeded.json", "bank.transfer.succeeded");
        round_trip::<TransferEvent>("transfer.failed.json", "bank.transfer.failed");
        round_trip::<InterestPaidEvent>("interest.paid.json", "bank.interest.paid");
        round_trip::<InterestMismatchEvent>(
            "alert.interest_mismatch.json",
            "bank.alert.interest_mismatch",
        );
    }

    #[test]
    fn ledger_event_id_is_account_and_seq() {
        let text = std::fs::read_to_string(format!(
            "{}/fixtures/ledger_entry.deposit.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let ev: LedgerEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(ev.event_id, ev.entry.event_id());
    }

    #[test]
    fn money_as_json_number_is_rejected_in_events() {
        let bad = serde_json::json!({
            "event_id": "t:succeeded", "transfer_id": "t", "from_account": "a",
            "to_account": "b", "amount": 100, "status": "succeeded",
            "occurred_at": "2026-11-21T00:00:00Z"
        });
        assert!(serde_json::from_value::<TransferEvent>(bad).is_err());
    }
}
