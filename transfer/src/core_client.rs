//! HTTP client of the core bank, with the service credential, a timeout per
//! call, and the current trace context in a `traceparent` header.

use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use common::events::{InterestPaidEvent, LedgerEntry};
use common::{AccountId, Amount, CustomerId, PayoutId, TransferId, Won};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;

/// How to reach the core: the settings shared by the transfer service and
/// the projector, flattened into each one's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct CoreLinkArgs {
    /// Base URL of the core bank.
    #[arg(
        long = "core-url",
        env = "CORE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub core_url: String,
    /// Service credential for the core.
    #[arg(
        long = "core-api-token",
        env = "CORE_API_TOKEN",
        default_value = "dev-core-token",
        hide_env_values = true
    )]
    pub core_api_token: common::config::Secret,
}

impl CoreLinkArgs {
    /// A client for this core whose calls time out after `default_timeout`
    /// unless a call says otherwise.
    pub fn client(&self, default_timeout: Duration) -> Result<CoreClient, reqwest::Error> {
        CoreClient::new(&self.core_url, &self.core_api_token, default_timeout)
    }
}

/// Why a core call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// No answer within the timeout: the request may or may not have executed.
    #[error("the core did not answer within {0:?}")]
    Timeout(Duration),
    /// The core could not be reached or failed (connection refused, 5xx).
    #[error("the core is unavailable: {0}")]
    Unavailable(String),
    /// The core is shedding load (503 `overloaded`: its queue is full);
    /// nothing executed. Calling it again at once would add to the load:
    /// callers pause longer first.
    #[error("the core is overloaded")]
    Overloaded,
    /// The core answered with an error in the API.md shape.
    #[error("the core answered {status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
        /// The whole body, to pass through.
        body: Value,
    },
    /// The answer did not parse.
    #[error("unexpected answer from the core: {0}")]
    Unexpected(String),
}

impl CoreError {
    /// True when no answer came from the core (it timed out, could not be
    /// reached, or failed with a 5xx): a later request may succeed.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CoreError::Timeout(_) | CoreError::Unavailable(_) | CoreError::Overloaded
        )
    }

    /// True when the core answered that it has no such account (404
    /// `account_not_found`).
    pub fn is_unknown_account(&self) -> bool {
        matches!(self, CoreError::Refused { status: 404, code, .. } if code == "account_not_found")
    }
}

/// An account as the core reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct CoreAccount {
    /// Id.
    pub account_id: AccountId,
    /// Owner.
    pub customer_id: CustomerId,
    /// Sequence number of the account's last ledger entry (0: none yet).
    pub last_seq: i64,
}

/// A transfer's outcome at the core. Any other status (a later core's, or a
/// body that is not the core's) does not parse: the answer is
/// [`CoreError::Unexpected`] and the transfer stays pending, rather than
/// being taken for a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoreTransferStatus {
    /// Executed: the money moved.
    Succeeded,
    /// Refused or fenced: it did not execute and never will.
    Failed,
}

/// A transfer decision as the core reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct CoreTransfer {
    /// Id.
    pub transfer_id: TransferId,
    /// The outcome.
    pub status: CoreTransferStatus,
    /// Refusal code when failed.
    pub reason: Option<String>,
    /// Debit entry.
    pub from_seq: Option<i64>,
    /// Credit entry.
    pub to_seq: Option<i64>,
}

/// An interest payout as the core recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CorePayout {
    /// Id.
    pub payout_id: PayoutId,
    /// The credited account.
    pub account_id: AccountId,
    /// Interest before tax.
    pub gross: Won,
    /// Withholding tax.
    pub tax: Won,
    /// Credited amount.
    pub net: Won,
    /// First business date covered.
    pub from: NaiveDate,
    /// Last business date covered.
    pub through: NaiveDate,
    /// When it committed.
    pub paid_at: DateTime<Utc>,
}

impl CorePayout {
    /// The event the core published for this payout.
    pub fn into_event(self) -> InterestPaidEvent {
        InterestPaidEvent {
            event_id: InterestPaidEvent::id_for(&self.payout_id),
            payout_id: self.payout_id,
            account_id: self.account_id,
            gross: self.gross,
            tax: self.tax,
            net: self.net,
            from: self.from,
            through: self.through,
            paid_at: self.paid_at,
        }
    }
}

/// A page of the core's entries API.
#[derive(Debug, Clone, Deserialize)]
pub struct EntriesPage {
    /// Ascending.
    pub entries: Vec<LedgerEntry>,
    /// The account's latest seq.
    pub last_seq: i64,
}

#[derive(Serialize)]
struct TransferRequest<'a> {
    transfer_id: &'a TransferId,
    from_account: &'a AccountId,
    to_account: &'a AccountId,
    amount: Amount,
    requested_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memo: Option<&'a str>,
}

/// Largest answer read from the core (a page of 1,000 entries is ~0.4 MiB);
/// anything bigger came from something else and is not read to the end.
const MAX_CORE_ANSWER_BYTES: usize = 4 << 20;

/// The answer's body, up to [`MAX_CORE_ANSWER_BYTES`].
async fn read_capped(mut resp: reqwest::Response, timeout: Duration) -> Result<Vec<u8>, CoreError> {
    let too_big = || {
        CoreError::Unexpected(format!(
            "an answer larger than {MAX_CORE_ANSWER_BYTES} bytes"
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_CORE_ANSWER_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(e, timeout))? {
        if body.len() + chunk.len() > MAX_CORE_ANSWER_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The core's API as seen from the channel.
#[derive(Debug, Clone)]
pub struct CoreClient {
    http: reqwest::Client,
    base: String,
    token: common::config::Secret,
    default_timeout: Duration,
}

impl CoreClient {
    /// A client for the core at `base` (e.g. `http://127.0.0.1:8081`).
    pub fn new(
        base: &str,
        token: &common::config::Secret,
        default_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.clone(),
            default_timeout,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        op: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<T, CoreError> {
        self.call_checked(op, method, path, body, timeout, Ok).await
    }

    /// [`Self::call`] whose 2xx answer must also pass `check` (an answer
    /// about another transfer is not the core's): one that fails it is
    /// recorded with outcome `unexpected`, as an answer that is not JSON is.
    async fn call_checked<T: DeserializeOwned, U>(
        &self,
        op: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
        check: impl FnOnce(T) -> Result<U, CoreError>,
    ) -> Result<U, CoreError> {
        let span = tracing::info_span!("core.call", otel.kind = "client", otel.name = %format!("core {op}"), http.path = %path);
        let started = Instant::now();
        let result = async {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(self.token.expose())
                .timeout(timeout);
            if let Some(tp) = common::telemetry::current_traceparent() {
                req = req.header(common::telemetry::TRACEPARENT, tp);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.map_err(|e| classify(e, timeout))?;
            let status = resp.status().as_u16();
            let bytes = read_capped(resp, timeout).await?;
            if (200..300).contains(&status) {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| CoreError::Unexpected(e.to_string()))
                    .and_then(check);
            }
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if status >= 500 {
                return Err(match body["error"]["code"].as_str() {
                    Some("overloaded") if status == 503 => CoreError::Overloaded,
                    Some(code) => CoreError::Unavailable(format!("status {status} {code}")),
                    None => CoreError::Unavailable(format!("status {status}")),
                });
            }
            Err(CoreError::Refused {
                status,
                code: body["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
                body,
            })
        }
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CoreError::Timeout(_)) => "timeout",
            Err(CoreError::Unavailable(_)) => "unavailable",
            Err(CoreError::Overloaded) => "overloaded",
            Err(CoreError::Refused { .. }) => "refused",
            Err(CoreError::Unexpected(_)) => "unexpected",
        };
        metrics::histogram!("core_call_duration_seconds", "op" => op, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// `GET /v1/accounts/{id}`.
    pub async fn account(&self, id: &AccountId) -> Result<CoreAccount, CoreError> {
        self.call(
            "account",
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}"),
            None,
            self.default_timeout,
        )
        .await
    }

    /// `POST /v1/transfers`, waiting at most `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn transfer(
        &self,
        transfer_id: &TransferId,
        from: &AccountId,
        to: &AccountId,
        amount: Amount,
        requested_at: DateTime<Utc>,
        memo: Option<&str>,
        timeout: Duration,
    ) -> Result<CoreTransfer, CoreError> {
        let body = serde_json::to_value(TransferRequest {
            transfer_id,
            from_account: from,
            to_account: to,
            amount,
            requested_at,
            memo,
        })
        .map_err(|e| CoreError::Unexpected(e.to_string()))?;
        self.call_checked(
            "transfer",
            reqwest::Method::POST,
            "/v1/transfers",
            Some(body),
            timeout,
            |t| of_transfer(t, transfer_id),
        )
        .await
    }

    /// `GET /v1/transfers/{id}`; `Ok(None)` when the core never received it.
    pub async fn transfer_status(
        &self,
        id: &TransferId,
    ) -> Result<Option<CoreTransfer>, CoreError> {
        self.get_unless_not_found(
            "transfer_status",
            &format!("/v1/transfers/{id}"),
            "transfer_not_found",
            |t| of_transfer(t, id),
        )
        .await
    }

    /// A `GET` whose 404 with the code `not_found` (the resource's own code,
    /// e.g. `transfer_not_found`) is an answer (`Ok(None)`).
    /// Any other 404 (a gateway's, a route missing behind a wrong `CORE_URL`)
    /// is an error, never taken for "the core has none".
    async fn get_unless_not_found<T: DeserializeOwned, U>(
        &self,
        op: &'static str,
        path: &str,
        not_found: &str,
        check: impl FnOnce(T) -> Result<U, CoreError>,
    ) -> Result<Option<U>, CoreError> {
        match self
            .call_checked(
                op,
                reqwest::Method::GET,
                path,
                None,
                self.default_timeout,
                check,
            )
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(CoreError::Refused {
                status: 404, code, ..
            }) if code == not_found => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/transfers/{id}/fence`.
    pub async fn fence(&self, id: &TransferId) -> Result<CoreTransfer, CoreError> {
        self.call_checked(
            "fence",
            reqwest::Method::POST,
            &format!("/v1/transfers/{id}/fence"),
            Some(Value::Object(Default::default())),
            self.default_timeout,
            |t| of_transfer(t, id),
        )
        .await
    }

    /// `GET /v1/accounts/{id}/entries?after_seq=&limit=`.
    pub async fn entries(
        &self,
        id: &AccountId,
        after_seq: i64,
        limit: u32,
    ) -> Result<EntriesPage, CoreError> {
        self.call(
            "entries",
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/entries?after_seq={after_seq}&limit={limit}"),
            None,
            self.default_timeout,
        )
        .await
    }

    /// `GET /v1/accounts/{id}/interest`, passed through as JSON.
    pub async fn interest(&self, id: &AccountId) -> Result<Value, CoreError> {
        self.call(
            "interest",
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/interest"),
            None,
            self.default_timeout,
        )
        .await
    }

    /// `POST /v1/accounts/{id}/interest/payouts`, passed through as JSON.
    pub async fn payout(&self, id: &AccountId, payout_id: &PayoutId) -> Result<Value, CoreError> {
        self.call(
            "payout",
            reqwest::Method::POST,
            &format!("/v1/accounts/{id}/interest/payouts"),
            Some(serde_json::json!({ "payout_id": payout_id })),
            self.default_timeout,
        )
        .await
    }

    /// `GET /v1/accounts/{id}/interest/payouts/{payout_id}`; `Ok(None)` when
    /// the core made no such payout to that account.
    pub async fn payout_of(
        &self,
        id: &AccountId,
        payout_id: &PayoutId,
    ) -> Result<Option<CorePayout>, CoreError> {
        self.get_unless_not_found(
            "payout_of",
            &format!("/v1/accounts/{id}/interest/payouts/{payout_id}"),
            "payout_not_found",
            Ok,
        )
        .await
    }

    /// `GET /v1/accounts?after=&limit=`: one page of accounts in id order,
    /// and the id to continue after (none on the last page).
    pub async fn accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<CoreAccount>, Option<String>), CoreError> {
        #[derive(Deserialize)]
        struct Page {
            accounts: Vec<CoreAccount>,
            next_after: Option<String>,
        }
        let mut path = format!("/v1/accounts?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        let page: Page = self
            .call(
                "accounts",
                reqwest::Method::GET,
                &path,
                None,
                self.default_timeout,
            )
            .await?;
        Ok((page.accounts, page.next_after))
    }
}

/// The core's answer about transfer `id`, or [`CoreError::Unexpected`] when
/// it is about another transfer (an answer that is not the core's).
fn of_transfer(t: CoreTransfer, id: &TransferId) -> Result<CoreTransfer, CoreError> {
    if t.transfer_id == *id {
        Ok(t)
    } else {
        Err(CoreError::Unexpected(format!(
            "an answer about transfer {} to a call about {id}",
            t.transfer_id
        )))
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> CoreError {
    if e.is_timeout() {
        CoreError::Timeout(timeout)
    } else {
        CoreError::Unavailable(e.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use axum::http::StatusCode;
    use common::AccountId;
    use serde_json::json;

    use super::{CoreClient, CoreError};

    /// A core answering every request with `status` and the error `code`.
    async fn core_answering(status: StatusCode, code: &'static str) -> CoreClient {
        core_answering_body(status, json!({"error": {"code": code, "message": "test"}})).await
    }

    /// A server answering every request with `status` and `body`.
    async fn core_answering_body(status: StatusCode, body: serde_json::Value) -> CoreClient {
        let app =
            axum::Router::new().fallback(move || async move { (status, axum::Json(body.clone())) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        CoreClient::new(
            &format!("http://{addr}"),
            &common::config::Secret::new("t"),
            Duration::from_secs(2),
        )
        .expect("client")
    }

    /// The core's own 503 `overloaded` (its queue is full) is told apart
    /// from other 5xx answers: the transfer service pauses longer before
    /// calling again after it.
    #[tokio::test]
    async fn f3_the_cores_overloaded_answer_is_told_apart_from_other_5xx() {
        let account = AccountId::generate();
        let overloaded = core_answering(StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
        assert!(matches!(
            overloaded.account(&account).await,
            Err(CoreError::Overloaded)
        ));
        for (status, code) in [
            (StatusCode::SERVICE_UNAVAILABLE, "account_busy"),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            (StatusCode::BAD_GATEWAY, "overloaded"),
        ] {
            let core = core_answering(status, code).await;
            let answer = core.account(&account).await;
            assert!(
                matches!(&answer, Err(CoreError::Unavailable(detail)) if detail.contains(code)),
                "{status} {code}: {answer:?}"
            );
        }
    }

    /// A 2xx answer about a transfer is taken as its outcome only when it is
    /// the core's: a status the client does not know (a later core's
    /// `processing`, say) or an answer about another transfer id leaves the
    /// transfer pending (`Unexpected`), never taken for a failure, and the
    /// call is counted as `unexpected`, not `ok`.
    #[tokio::test]
    async fn b12_an_answer_that_is_not_a_known_outcome_of_this_transfer_is_unexpected() {
        // This test's calls only (a current-thread runtime: the guard holds
        // across its awaits).
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let id = common::TransferId::generate();
        let other = common::TransferId::generate();
        for body in [
            json!({"transfer_id": id.as_str(), "status": "processing"}),
            json!({"transfer_id": other.as_str(), "status": "failed", "reason": "insufficient_funds"}),
        ] {
            let core = core_answering_body(StatusCode::OK, body.clone()).await;
            for answer in [
                core.fence(&id).await,
                core.transfer_status(&id)
                    .await
                    .and_then(|t| t.ok_or_else(|| CoreError::Unexpected("none".into()))),
            ] {
                assert!(
                    matches!(&answer, Err(CoreError::Unexpected(_))),
                    "{body}: {answer:?}"
                );
            }
        }
        let counted = metrics.render();
        for op in ["fence", "transfer_status"] {
            let line =
                format!("core_call_duration_seconds_count{{op=\"{op}\",outcome=\"unexpected\"}} 2");
            assert!(counted.contains(&line), "{line} not in:\n{counted}");
        }
        assert!(!counted.contains("outcome=\"ok\""), "{counted}");
        let core = core_answering_body(
            StatusCode::OK,
            json!({"transfer_id": id.as_str(), "status": "failed", "reason": "never_received"}),
        )
        .await;
        let fenced = core.fence(&id).await.expect("the core's answer");
        assert_eq!(fenced.status, super::CoreTransferStatus::Failed);
        assert!(
            metrics
                .render()
                .contains("core_call_duration_seconds_count{op=\"fence\",outcome=\"ok\"} 1")
        );
    }
}
