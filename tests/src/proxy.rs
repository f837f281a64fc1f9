//! A fault-injecting HTTP proxy, placed between the transfer service and the
//! core. Per request matching a rule it can pass, delay the request, delay
//! the answer, lose the request (never forward, never answer), or hold it
//! until released and then forward it (a late arrival).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::{oneshot, watch};

/// What to do with a matching request.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward at once.
    Pass,
    /// Wait, then forward.
    DelayRequest(Duration),
    /// Forward at once, wait before answering.
    DelayResponse(Duration),
    /// Forward at once, keep the answer until the next
    /// [`FaultProxy::release_held`] after the rule was added: an answer
    /// that reaches its client only after the upstream has moved on.
    HoldResponse,
    /// Never forward, never answer (the client times out).
    Drop,
    /// Keep until the next [`FaultProxy::release_held`] after the rule was
    /// added, then forward (nobody hears the answer). A matching request that
    /// arrives after that release is forwarded at once: a release is never
    /// lost on a request that was still on its way.
    Hold,
    /// Answer this status without forwarding.
    Fail(u16),
    /// Answer this status with an error body in API.md's shape carrying
    /// this code, without forwarding: what the core itself answers (a 503
    /// `overloaded` when its queue is full).
    FailAs(u16, &'static str),
    /// Answer this status at once, and forward the request anyway at the
    /// next [`FaultProxy::release_held`] (nobody hears the core's answer): a
    /// gateway that answered an error while a retried or mirrored copy of the
    /// request still went on.
    FailAndHold(u16),
}

impl Action {
    /// The action's name, as [`FaultProxy::applied`] lists it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::DelayRequest(_) => "delay request",
            Action::DelayResponse(_) => "delay response",
            Action::HoldResponse => "hold response",
            Action::Drop => "drop",
            Action::Hold => "hold",
            Action::Fail(_) => "fail",
            Action::FailAs(..) => "fail as the core",
            Action::FailAndHold(_) => "fail and hold",
        }
    }
}

/// A rule: requests whose method and path match get the action, for the next
/// `times` matches (`None`: forever).
#[derive(Debug, Clone)]
pub struct Rule {
    /// Method to match (`None`: any).
    pub method: Option<Method>,
    /// Substring the path must contain; with a trailing `$`, the whole
    /// path (`/v1/transfers$` matches that path, not `/v1/transfers/{id}`).
    pub path_contains: String,
    /// What to do.
    pub action: Action,
    /// Matches left.
    pub times: Option<usize>,
    /// For [`Action::Hold`]: the release count that frees its requests.
    released_by: u64,
}

struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<(Method, String, std::time::Instant)>>,
    forwarded: Mutex<Vec<(Method, String)>>,
    answered: Mutex<Vec<(Method, String, u16)>>,
    applied: Mutex<Vec<(Method, String, &'static str)>>,
    /// How many times [`FaultProxy::release_held`] was called.
    releases: watch::Sender<u64>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            rules: Mutex::default(),
            seen: Mutex::default(),
            forwarded: Mutex::default(),
            answered: Mutex::default(),
            applied: Mutex::default(),
            releases: watch::Sender::new(0),
        }
    }
}

/// A running proxy.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (e.g. `http://127.0.0.1:1234`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            shared: shared.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let app = Router::new().fallback(forward).with_state(state);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            port,
            shared,
            stop: Some(tx),
        })
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adds a rule (checked in order; the first match applies).
    pub fn add(
        &self,
        method: Option<Method>,
        path_contains: &str,
        action: Action,
        times: Option<usize>,
    ) {
        if let Ok(mut r) = self.shared.rules.lock() {
            r.push(Rule {
                method,
                path_contains: path_contains.to_owned(),
                action,
                times,
                released_by: *self.shared.releases.borrow() + 1,
            });
        }
    }

    /// Removes every rule: everything passes again.
    pub fn clear(&self) {
        if let Ok(mut r) = self.shared.rules.lock() {
            r.clear();
        }
    }

    /// Removes the rules added for `path_contains`; the others stay.
    pub fn remove(&self, path_contains: &str) {
        if let Ok(mut r) = self.shared.rules.lock() {
            r.retain(|rule| rule.path_contains != path_contains);
        }
    }

    /// Forwards every held request now, and those of the current hold
    /// rules that have not reached the proxy yet as soon as they do; passes
    /// every held answer on ([`Action::HoldResponse`]) the same way.
    pub fn release_held(&self) {
        self.shared.releases.send_modify(|n| *n += 1);
    }

    /// Requests that reached the proxy, as (method, path, when).
    pub fn seen(&self) -> Vec<(Method, String, std::time::Instant)> {
        snapshot(&self.shared.seen)
    }

    /// Requests the upstream answered, as (method, path, status), whether or
    /// not the client still listened.
    pub fn answered(&self) -> Vec<(Method, String, u16)> {
        snapshot(&self.shared.answered)
    }

    /// Requests a rule other than [`Action::Pass`] applied to, as (method,
    /// path, [`Action::name`]): the faults that took effect.
    pub fn applied(&self) -> Vec<(Method, String, &'static str)> {
        snapshot(&self.shared.applied)
    }

    /// Requests forwarded to the upstream, as (method, path).
    pub fn forwarded(&self) -> Vec<(Method, String)> {
        snapshot(&self.shared.forwarded)
    }
}

fn snapshot<T: Clone>(log: &Mutex<Vec<T>>) -> Vec<T> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.shared.releases.send_modify(|n| *n = u64::MAX);
    }
}

fn action_for(shared: &Shared, method: &Method, path: &str) -> (Action, u64) {
    let Ok(mut rules) = shared.rules.lock() else {
        return (Action::Pass, 0);
    };
    for rule in rules.iter_mut() {
        let method_ok = rule.method.as_ref().is_none_or(|m| m == method);
        let path_ok = match rule.path_contains.strip_suffix('$') {
            Some(whole) => path == whole,
            None => path.contains(&rule.path_contains),
        };
        if method_ok && path_ok && rule.times != Some(0) {
            if let Some(t) = rule.times.as_mut() {
                *t -= 1;
            }
            return (rule.action.clone(), rule.released_by);
        }
    }
    (Action::Pass, 0)
}

/// Runs the request in its own task, so a client that gives up (a timeout)
/// does not cancel it: a delayed or held request still reaches the upstream
/// late, as it would through a slow network.
async fn forward(
    State(s): State<ProxyState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(forward_detached(s, method, uri, headers, body).await);
    });
    rx.await
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

async fn forward_detached(
    s: ProxyState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if let Ok(mut seen) = s.shared.seen.lock() {
        seen.push((method.clone(), path.clone(), std::time::Instant::now()));
    }
    let (action, released_by) = action_for(&s.shared, &method, &path);
    if !matches!(action, Action::Pass)
        && let Ok(mut applied) = s.shared.applied.lock()
    {
        applied.push((method.clone(), path.clone(), action.name()));
    }
    let mut answer_after = None;
    match action {
        Action::Pass => {}
        Action::DelayRequest(d) => tokio::time::sleep(d).await,
        Action::DelayResponse(d) => answer_after = Some(AnswerAfter::Delay(d)),
        Action::HoldResponse => answer_after = Some(AnswerAfter::Release(released_by)),
        Action::Drop => std::future::pending::<()>().await,
        Action::Hold => {
            let mut releases = s.shared.releases.subscribe();
            // Err only when the sender is gone, i.e. the proxy is dropped.
            let _ = releases.wait_for(|n| *n >= released_by).await;
        }
        Action::Fail(code) => {
            return StatusCode::from_u16(code)
                .unwrap_or(StatusCode::BAD_GATEWAY)
                .into_response();
        }
        Action::FailAs(status, code) => {
            return (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                axum::Json(
                    serde_json::json!({"error": {"code": code, "message": "from the test proxy"}}),
                ),
            )
                .into_response();
        }
        Action::FailAndHold(code) => {
            tokio::spawn(async move {
                let mut releases = s.shared.releases.subscribe();
                let _ = releases.wait_for(|n| *n >= released_by).await;
                let _ = send_upstream(&s, method, path, headers, body, None).await;
            });
            return StatusCode::from_u16(code)
                .unwrap_or(StatusCode::BAD_GATEWAY)
                .into_response();
        }
    }
    send_upstream(&s, method, path, headers, body, answer_after).await
}

/// When an upstream's answer goes on to the client.
enum AnswerAfter {
    /// This long after it came.
    Delay(Duration),
    /// At this release count ([`FaultProxy::release_held`]).
    Release(u64),
}

async fn send_upstream(
    s: &ProxyState,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    answer_after: Option<AnswerAfter>,
) -> Response {
    if let Ok(mut f) = s.shared.forwarded.lock() {
        f.push((method.clone(), path.clone()));
    }
    let mut req = s
        .http
        .request(method.clone(), format!("{}{path}", s.upstream))
        .body(body);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status();
    let resp_headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    if let Ok(mut a) = s.shared.answered.lock() {
        a.push((method, path, status.as_u16()));
    }
    match answer_after {
        None => {}
        Some(AnswerAfter::Delay(d)) => tokio::time::sleep(d).await,
        Some(AnswerAfter::Release(released_by)) => {
            let mut releases = s.shared.releases.subscribe();
            // Err only when the sender is gone, i.e. the proxy is dropped.
            let _ = releases.wait_for(|n| *n >= released_by).await;
        }
    }
    let mut out = (status, bytes).into_response();
    for (k, v) in resp_headers.iter() {
        if k != "content-length" && k != "transfer-encoding" {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}
