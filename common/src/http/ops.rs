use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use super::{ApiError, MAX_BODY_BYTES};
use crate::telemetry::{TRACEPARENT, set_remote_parent};

/// A named dependency check for `/readyz`.
pub type ReadinessCheck = (
    &'static str,
    Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>,
);

/// What `/readyz` reports: every dependency check passes and the service is
/// not draining. Draining starts on SIGTERM, before the listener closes, so a
/// load balancer stops sending new work first.
///
/// A check that starts failing is logged once at warn, with the driver's
/// error; while it keeps failing, each probe logs at debug only (probes come
/// every few seconds from every load balancer), and when it passes again
/// that is logged at info.
#[derive(Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
    checks: Arc<Vec<(ReadinessCheck, AtomicBool)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .field(
                "checks",
                &self
                    .checks
                    .iter()
                    .map(|((name, _), _)| *name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Readiness {
    /// Readiness over the given checks.
    pub fn new(checks: Vec<ReadinessCheck>) -> Self {
        Self {
            draining: Arc::new(AtomicBool::new(false)),
            checks: Arc::new(
                checks
                    .into_iter()
                    .map(|c| (c, AtomicBool::new(false)))
                    .collect(),
            ),
        }
    }

    /// Readiness of a service whose dependencies are one database and NATS:
    /// the database answers a ping and the NATS connection is up.
    pub fn database_and_nats(db: DatabaseConnection, nats: async_nats::Client) -> Self {
        Self::new(vec![
            (
                "database",
                Arc::new(move || {
                    let db = db.clone();
                    Box::pin(async move { db.ping().await.map_err(|e| e.to_string()) })
                }),
            ),
            (
                "nats",
                Arc::new(move || {
                    let state = nats.connection_state();
                    Box::pin(async move {
                        match state {
                            async_nats::connection::State::Connected => Ok(()),
                            other => Err(format!("nats {other}")),
                        }
                    })
                }),
            ),
        ])
    }

    /// On `shutdown`: `/readyz` turns 503 at once, and after `delay` the
    /// returned token fires to stop the HTTP listener (so a load balancer
    /// stops sending work before connections are refused).
    pub fn drain_on(&self, shutdown: CancellationToken, delay: Duration) -> CancellationToken {
        let stop = CancellationToken::new();
        let (trigger, readiness) = (stop.clone(), self.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.start_draining();
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "draining: readiness is 503"
            );
            tokio::time::sleep(delay).await;
            trigger.cancel();
        });
        stop
    }

    /// Marks the service as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    async fn report(&self) -> (bool, serde_json::Value) {
        let mut ok = !self.is_draining();
        let mut checks = serde_json::Map::new();
        for ((name, check), failing) in self.checks.iter() {
            // The detail (a driver's error text) goes to the log, not to
            // whoever can reach the probe.
            let (status, failure) =
                match tokio::time::timeout(READINESS_CHECK_TIMEOUT, check()).await {
                    Ok(Ok(())) => ("ok", None),
                    Ok(Err(e)) => ("failed", Some(e)),
                    Err(_) => ("timed out after 2 s", Some("no answer in 2 s".to_owned())),
                };
            ok &= failure.is_none();
            let was_failing = failing.swap(failure.is_some(), Ordering::Relaxed);
            match (failure, was_failing) {
                (Some(error), false) => tracing::warn!(
                    check = %name,
                    %error,
                    "readiness check failed (logged at debug until it passes again)"
                ),
                (Some(error), true) => {
                    tracing::debug!(check = %name, %error, "readiness check still failing")
                }
                (None, true) => tracing::info!(check = %name, "readiness check passes again"),
                (None, false) => {}
            }
            checks.insert((*name).to_owned(), json!(status));
        }
        let body = json!({
            "status": if ok { "ready" } else { "not_ready" },
            "draining": self.is_draining(),
            "checks": checks,
        });
        (ok, body)
    }
}

/// How long one readiness check may take before it counts as failed.
const READINESS_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "alive"}))
}

async fn readyz(State(readiness): State<Readiness>) -> Response {
    let (ok, body) = readiness.report().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics_text() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Most requests a service handles at once; beyond it new requests are
/// answered 503 `overloaded` at once instead of queueing without bound.
pub const MAX_IN_FLIGHT: usize = 1024;

async fn limit_in_flight(
    State(permits): State<Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            metrics::counter!("http_requests_shed_total").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight; retry later",
            )
            .into_response()
        }
    }
}

/// When the request timeout answers 503 for this request, as a request
/// extension of the API routes: a handler that must answer before it (a
/// transfer whose pending row is written) reads it.
#[derive(Debug, Clone, Copy)]
pub struct AnswerDeadline(pub tokio::time::Instant);

/// Answers 503 `timeout` in the error format when the handler has not
/// answered within the request timeout. The handler's future is dropped;
/// its writes are transactions, so nothing is left half done, but work it
/// handed on may still complete (a command already in the core's ledger
/// queue executes; a transfer request's execution goes on): ids make a
/// retry of such a request safe, which is what the answer asks for. Inside the
/// metrics layer, so a timeout is counted like any other answer.
async fn answer_within(State(limit): State<Duration>, mut req: Request, next: Next) -> Response {
    req.extensions_mut()
        .insert(AnswerDeadline(tokio::time::Instant::now() + limit));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_request_timeouts_total").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "no answer within {} ms; retry later (with the same id, where the request has one)",
                    limit.as_millis()
                ),
            )
            .into_response()
        }
    }
}

async fn record_http_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

fn traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
}

/// Wraps a service's API router with what every service has: `/healthz`,
/// `/readyz`, `/metrics`, JSON 404/405 answers, a body limit, a request
/// timeout, a trace span per request (continuing the caller's `traceparent`)
/// and request metrics.
///
/// The limit on requests in flight and the request timeout guard the API
/// only: an overloaded service still answers its probes and its scrape (a
/// liveness probe that failed under load would restart a replica that is
/// only busy, and make the overload worse), and a request it sheds is
/// counted in `http_requests_total` like any other 503.
pub fn with_edge(api: Router, readiness: Readiness, request_timeout: Duration) -> Router {
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(readiness);
    let api = api
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            request_timeout,
            answer_within,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            limit_in_flight,
        ));
    api.merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(record_http_metrics))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| req.uri().path().to_owned());
            let span = tracing::info_span!(
                "http.request",
                otel.name = %format!("{} {}", req.method(), route),
                otel.kind = "server",
                http.method = %req.method(),
                http.route = %route,
            );
            set_remote_parent(&span, traceparent(req.headers()));
            span
        }))
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting and waits for the requests in flight (each bounded by the
/// request timeout); logs that `service` serves, and where.
pub async fn serve(
    service: &str,
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), crate::service::ServiceError> {
    use crate::service::StepExt;
    let addr = listener
        .local_addr()
        .step("reading the listener's address")?;
    tracing::info!(%addr, "{service} serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .step("serving HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// What a log subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut log) = self.0.lock() {
                log.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl tracing_subscriber::fmt::MakeWriter<'_> for Captured {
        type Writer = Captured;

        fn make_writer(&self) -> Captured {
            self.clone()
        }
    }

    #[tokio::test]
    async fn a_failing_readiness_check_warns_once_then_logs_at_debug_until_it_passes_again() {
        let up = Arc::new(AtomicBool::new(false));
        let probe = up.clone();
        let check: ReadinessCheck = (
            "broker",
            Arc::new(move || {
                let up = probe.load(Ordering::SeqCst);
                Box::pin(async move {
                    if up {
                        Ok(())
                    } else {
                        Err("connection refused".to_owned())
                    }
                })
            }),
        );
        let readiness = Readiness::new(vec![check]);
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .without_time()
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let mut answers = Vec::new();
        for up_now in [false, false, false, true, true, false] {
            up.store(up_now, Ordering::SeqCst);
            let (ok, body) = readiness.report().await;
            answers.push((ok, body["checks"]["broker"].clone()));
        }

        let failed = (false, json!("failed"));
        let passed = (true, json!("ok"));
        assert_eq!(
            answers,
            [
                failed.clone(),
                failed.clone(),
                failed.clone(),
                passed.clone(),
                passed,
                failed
            ]
        );
        let text = logs
            .0
            .lock()
            .map(|log| String::from_utf8_lossy(&log).into_owned())
            .unwrap_or_default();
        let levels: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("check=broker"))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        assert_eq!(levels, ["WARN", "DEBUG", "DEBUG", "INFO", "WARN"], "{text}");
        assert!(
            text.lines()
                .next()
                .is_some_and(|first| first.contains("connection refused")),
            "the first warning carries the error: {text}"
        );
    }

    #[tokio::test]
    async fn a_request_without_an_answer_in_time_gets_503_timeout_in_the_error_format() {
        // A handler that never answers: the fault is the missing answer.
        let api = Router::new().route("/never", get(std::future::pending::<&'static str>));
        let app = with_edge(api, Readiness::new(Vec::new()), Duration::from_millis(50));
        let response = app
            .oneshot(
                Request::builder()
                    .uri("/never")
                    .body(Body::empty())
                    .unwrap_or_default(),
            )
            .await
            .unwrap_or_else(|e| match e {});
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["error"]["code"], "timeout", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("50 ms")),
            "{v}"
        );
    }

    async fn get_status(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap_or_default(),
            )
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024 * 1024)
            .await
            .unwrap_or_default();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_service_with_every_place_in_flight_taken_sheds_api_requests_but_answers_its_probes()
    {
        // Handlers that never answer (until the test ends) fill every place.
        let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = entered.clone();
        let api = Router::new().route(
            "/stuck",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<&'static str>()
            }),
        );
        let app = with_edge(api, Readiness::new(Vec::new()), Duration::from_secs(600));
        let mut stuck = tokio::task::JoinSet::new();
        for _ in 0..MAX_IN_FLIGHT {
            let app = app.clone();
            stuck.spawn(async move { get_status(&app, "/stuck").await });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while entered.load(Ordering::SeqCst) < MAX_IN_FLIGHT {
            assert!(
                Instant::now() < deadline,
                "the stuck requests never all started"
            );
            tokio::task::yield_now().await;
        }

        let (status, body) = get_status(&app, "/stuck").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        for probe in ["/healthz", "/readyz", "/metrics"] {
            let (status, _) = get_status(&app, probe).await;
            assert_eq!(status, StatusCode::OK, "{probe} while the API is full");
        }
        let (status, body) = get_status(&app, "/no-such-route").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
        stuck.abort_all();
    }
}
