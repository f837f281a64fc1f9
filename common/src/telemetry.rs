//! Logging and tracing.
//!
//! Logs are structured `tracing` events, as text or JSON lines. Spans are also
//! OpenTelemetry spans: the W3C trace context is carried in HTTP headers, in
//! outbox rows and in NATS `traceparent` headers, so one customer transfer is
//! one trace across the three services. Spans are exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise they still get ids (for log
//! correlation and propagation) but go nowhere.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryArgs};

/// The W3C trace-context header name.
pub const TRACEPARENT: &str = "traceparent";

/// Keeps the tracer provider alive; call [`TelemetryGuard::shutdown`] before
/// exit so buffered spans are flushed.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops span export (bounded to 5 s).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "telemetry shutdown");
        }
    }
}

/// Where the logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Standard output: a service's logs.
    Stdout,
    /// Standard error: a command (`verify-interest`, `dlq list`, ...) whose
    /// standard output is its result, for a pipe or a script to read.
    Stderr,
}

impl LogOutput {
    /// Standard error when the process runs a command (its standard output
    /// is the command's result), standard output when it runs the service.
    pub fn for_process(runs_a_command: bool) -> Self {
        if runs_a_command {
            Self::Stderr
        } else {
            Self::Stdout
        }
    }
}

/// Installs the global subscriber: env filter, text or JSON logs to
/// `output`, and the OpenTelemetry layer. Must run inside a tokio runtime
/// (the OTLP exporter needs one). Calling it twice in one process keeps the
/// first subscriber.
pub fn init(
    service_name: &'static str,
    args: &TelemetryArgs,
    output: LogOutput,
) -> Result<TelemetryGuard, opentelemetry_otlp::ExporterBuildError> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build());
    if let Some(endpoint) = &args.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service_name);

    // Logs and spans are filtered separately: quiet logs (RUST_LOG=warn) must
    // not switch off the spans that carry the trace across services.
    let log_filter =
        EnvFilter::try_new(&args.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let span_filter =
        EnvFilter::try_new(&args.trace_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = move || -> Box<dyn std::io::Write> {
        match output {
            LogOutput::Stdout => Box::new(std::io::stdout()),
            LogOutput::Stderr => Box::new(std::io::stderr()),
        }
    };
    let fmt_layer = match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(true)
            .with_writer(writer)
            .boxed(),
    };
    let result = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(log_filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(span_filter),
        )
        .try_init();
    if result.is_err() {
        tracing::debug!("a global subscriber was already installed; keeping it");
    }
    Ok(TelemetryGuard { provider })
}

/// The `traceparent` of the current span, if it has a valid trace context.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of a span, if it has a valid trace context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span described by `traceparent`. An
/// absent or malformed header leaves the span as a new root.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let mut carrier = HashMap::new();
    carrier.insert(TRACEPARENT.to_owned(), tp.to_owned());
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// A syntactically valid `traceparent` for a new, unrelated trace; used when a
/// message has no stored context so the header is always present.
pub fn fresh_traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The trace id part of a `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}
