//! Prometheus metrics.
//!
//! One recorder per process, installed on first use. Latencies are histograms
//! with explicit buckets (never summaries) so they aggregate across replicas.
//! Names follow Prometheus conventions: `_total` for counters, base units
//! (`_seconds`, `_bytes`) in the name. Latency histograms end in
//! `_duration_seconds`, lag histograms in `_lag_seconds`, batch-size
//! histograms in `_batch_size`; each family has its own explicit buckets.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets for request and transaction latencies, in seconds (0.5 ms .. 10 s).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for projection lag, in seconds (1 ms .. 10 min).
pub const LAG_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// Buckets for batch sizes.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first call.
/// If another recorder was installed first (only possible in tests), a
/// detached recorder is returned so rendering still works.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = || {
                PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("lag_seconds".into()), LAG_BUCKETS_SECONDS)
                    .and_then(|b| {
                        b.set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS_SECONDS)
                    })
                    .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("batch_size".into()), BATCH_BUCKETS))
            };
            match builder().and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "prometheus recorder not installed; using a detached one");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}
