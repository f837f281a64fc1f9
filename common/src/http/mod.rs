//! The HTTP edge every service shares: the JSON error shape of API.md, JSON
//! extractors whose rejections use that shape, the operational endpoints
//! (`/healthz`, `/readyz`, `/metrics`), request metrics and trace spans, body
//! limits and graceful serving.

mod error;
mod extract;
mod ops;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use extract::{Json, Path, Query};
pub use ops::{AnswerDeadline, Readiness, ReadinessCheck, serve, with_edge};

/// Largest accepted request body, in bytes. Bodies of this API are small; a
/// larger one is refused with 413 before it is parsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The page size a query asks for with `limit`: `default` when absent, 400
/// `invalid_query` outside `1..=max`.
pub fn page_limit(limit: Option<u64>, default: u64, max: u64) -> Result<u64, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {max}"),
        ))
    }
}

/// The credential of an `Authorization: Bearer <credential>` header. The
/// scheme is matched without regard to case (RFC 7235: `bearer` and `BEARER`
/// are the same scheme); the credential is returned as sent.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim_start_matches(' '))
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};

    use super::bearer_token;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        assert_eq!(bearer_token(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("BEARER  abc")), Some("abc"));
        assert_eq!(bearer_token(&with("Basic abc")), None);
        assert_eq!(bearer_token(&with("Bearerabc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
