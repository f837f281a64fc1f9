//! A small JSON-over-HTTP client for tests.

use std::time::Duration;

use serde_json::{Value, json};

/// An HTTP answer: status and JSON body (`Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub body: Value,
}

impl Reply {
    /// `body.error.code`, if the body is an error.
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// A string field of the body.
    pub fn str(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string field {field:?} in {} {}", self.status, self.body))
            .to_owned()
    }

    /// Asserts the status and returns self.
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "unexpected answer: {}", self.body);
        self
    }
}

/// A client for one service, with an optional bearer token.
#[derive(Clone, Debug)]
pub struct Api {
    http: reqwest::Client,
    /// Base URL, like `http://127.0.0.1:1234`.
    pub base: String,
    token: Option<String>,
}

impl Api {
    /// A client for `base` that sends `token` as a bearer token.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .build()
                .expect("http client"),
            base: base.into(),
            token,
        }
    }

    /// The bearer token sent, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The same service with another token.
    pub fn with_token(&self, token: Option<String>) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token,
        }
    }

    /// Sends a request with an optional JSON body and extra headers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_send(method, path, body, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {}{path}: {e}", self.base))
    }

    /// Like [`Api::send`] but returns transport errors.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }

    /// Sends raw bytes with a content type.
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        self.send_bytes(method, path, &[("content-type", content_type)], body)
            .await
    }

    /// Sends raw bytes with exactly these headers (none: no `Content-Type`).
    pub async fn send_bytes(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None, &[]).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, Some(body), &[]).await
    }

    /// PATCH with a JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.send("PATCH", path, Some(body), &[]).await
    }

    /// PUT with a JSON body.
    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(body), &[]).await
    }

    // ---- core-bank helpers ----

    /// Creates a customer and returns its id.
    pub async fn new_customer(&self, name: &str) -> String {
        self.post("/v1/customers", json!({ "name": name }))
            .await
            .expect(201)
            .str("customer_id")
    }

    /// Opens an account for a customer and returns its id.
    pub async fn new_account(&self, customer_id: &str) -> String {
        self.post("/v1/accounts", json!({ "customer_id": customer_id }))
            .await
            .expect(201)
            .str("account_id")
    }

    /// The core's business date (`GET /v1/admin/clock`).
    pub async fn business_date(&self) -> chrono::NaiveDate {
        self.get("/v1/admin/clock")
            .await
            .expect(200)
            .str("today")
            .parse()
            .expect("a date")
    }

    /// Moves the core's (test) business date `days` ahead; the new date.
    pub async fn advance_business_date(&self, days: i64) -> chrono::NaiveDate {
        let next = self.business_date().await + chrono::Duration::days(days);
        let r = self
            .post("/v1/admin/clock", json!({"today": next.to_string()}))
            .await
            .expect(200);
        assert_eq!(r.str("today"), next.to_string());
        next
    }

    /// Opens an account (for a new customer) funded with `amount` won.
    pub async fn funded_account(&self, amount: u64) -> String {
        let c = self.new_customer("Test Customer").await;
        let a = self.new_account(&c).await;
        if amount > 0 {
            self.deposit(&a, amount).await.expect(200);
        }
        a
    }

    /// A funded account whose state was then changed with `PATCH` (for
    /// example `{"status": "suspended"}` or `{"deposit_stopped": true}`).
    pub async fn funded_account_with(&self, amount: u64, patch: Value) -> String {
        let a = self.funded_account(amount).await;
        self.patch(&format!("/v1/accounts/{a}"), patch)
            .await
            .expect(200);
        a
    }

    /// Deposits from another bank with a fresh deposit id.
    pub async fn deposit(&self, account: &str, amount: u64) -> Reply {
        self.post(
            "/v1/deposits",
            json!({
                "deposit_id": crate::unique("dep_"),
                "to_account": account,
                "amount": amount.to_string(),
                "sender_bank": "KB Kookmin",
                "sender_name": "Hong Gildong",
            }),
        )
        .await
    }

    /// Transfers at the core with a fresh id, requested now.
    pub async fn core_transfer(&self, from: &str, to: &str, amount: u64) -> Reply {
        self.post(
            "/v1/transfers",
            transfer_body(&crate::unique("trf_"), from, to, amount),
        )
        .await
    }

    /// The balance of an account at the core, in won.
    pub async fn balance(&self, account: &str) -> i128 {
        let r = self
            .get(&format!("/v1/accounts/{account}"))
            .await
            .expect(200);
        r.str("balance").parse().expect("balance")
    }

    /// All entries of an account at the core, ascending.
    pub async fn all_entries(&self, account: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = self
                .get(&format!(
                    "/v1/accounts/{account}/entries?after_seq={after}&limit=1000"
                ))
                .await
                .expect(200);
            let page = r.body["entries"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return out;
            }
            after = page.last().and_then(|e| e["seq"].as_i64()).unwrap_or(after);
            out.extend(page);
        }
    }
}

/// A core transfer body requested now.
pub fn transfer_body(id: &str, from: &str, to: &str, amount: u64) -> Value {
    json!({
        "transfer_id": id,
        "from_account": from,
        "to_account": to,
        "amount": amount.to_string(),
        "requested_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}
