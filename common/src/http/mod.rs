//! The HTTP edge every service shares: the JSON error shape of API.md, JSON
//! extractors whose rejections use that shape, the operational endpoints
//! (`/healthz`, `/readyz`, `/metrics`), request metrics and trace spans, body
//! limits and graceful serving.

mod error;
mod extract;
mod ops;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use extract::{Json, Path, Query};
pub use ops::{Readiness, ReadinessCheck, serve, with_edge};

/// Largest accepted request body, in bytes. Bodies of this API are small; a
/// larger one is refused with 413 before it is parsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
