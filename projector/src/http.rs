//! The projector's operations API: dead letters and tax records. When
//! `PROJECTOR_API_TOKEN` is set, `/v1` routes require it as a bearer token.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::AccountId;
use common::http::{ApiError, ErrorBody, Path, Query, Readiness};
use rust_decimal::Decimal;
use sea_orm::{ConnectionTrait, Statement};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::consume::Context;
use crate::consume::dlq::{self, DeadLetter, ReplayError};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "projector",
        description = "Projector operations: dead letters and tax records. `/v1` routes require `Authorization: Bearer $PROJECTOR_API_TOKEN` when that is set."
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The whole HTTP application.
pub fn router(
    ctx: Context,
    readiness: Readiness,
    token: Option<String>,
    request_timeout: Duration,
) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_dead_letters))
        .routes(routes!(show_dead_letter))
        .routes(routes!(replay_dead_letter))
        .routes(routes!(tax_records))
        .split_for_parts();
    let mut api = api.with_state(ctx);
    if let Some(t) = token {
        api = api.route_layer(axum::middleware::from_fn_with_state(
            Arc::<str>::from(t.as_str()),
            require_token,
        ));
    }
    let doc = Arc::new(doc);
    let api = api.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    );
    common::http::with_edge(api, readiness, request_timeout)
}

async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    let presented = common::http::bearer_token(req.headers()).unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::unauthorized("a valid operator token is required").into_response()
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Letters with ids after this one (a letter id, digits).
    #[param(value_type = Option<String>)]
    after: Option<u64>,
    /// 1..=1000, default 100.
    limit: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct DeadLetters {
    dead_letters: Vec<DeadLetter>,
    /// `after` for the next page (a letter id); null on the last page.
    #[serde(serialize_with = "dlq::as_optional_string")]
    #[schema(value_type = Option<String>)]
    next_after: Option<u64>,
}

/// Dead letters, oldest first.
#[utoipa::path(get, path = "/v1/dead-letters", params(ListQuery), responses((status = 200, body = DeadLetters)))]
async fn list_dead_letters(
    State(ctx): State<Context>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<DeadLetters>, ApiError> {
    let limit = common::http::page_limit(q.limit, 100, 1000)?;
    let page = dlq::list(&ctx, q.after.unwrap_or(0), limit as usize)
        .await
        .map_err(dead_letter_stream_unavailable)?;
    Ok(axum::Json(DeadLetters {
        dead_letters: page.letters,
        next_after: page.next_after,
    }))
}

/// 503 for a failure to read the dead-letter stream; the detail is logged.
fn dead_letter_stream_unavailable(e: dlq::StreamError) -> ApiError {
    tracing::warn!(
        error = common::error_chain(&e),
        "the dead-letter stream failed"
    );
    ApiError::unavailable("the dead-letter stream cannot be read; retry later")
}

fn parse_letter_id(id: &str) -> Result<u64, ApiError> {
    id.parse().ok().filter(|&id: &u64| id > 0).ok_or_else(|| {
        ApiError::bad_request("invalid_id", "a dead letter id is a positive integer")
    })
}

/// One dead letter.
#[utoipa::path(get, path = "/v1/dead-letters/{id}", params(("id" = String, Path, description = "dead letter id (digits)")),
    responses((status = 200, body = DeadLetter), (status = 404, body = ErrorBody)))]
async fn show_dead_letter(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<axum::Json<DeadLetter>, ApiError> {
    let id = parse_letter_id(&id)?;
    match dlq::get(&ctx, id).await {
        Ok(Some(l)) => Ok(axum::Json(l)),
        Ok(None) => Err(ApiError::not_found(
            "dead_letter_not_found",
            format!("no dead letter {id}"),
        )),
        Err(e) => Err(dead_letter_stream_unavailable(e)),
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::NotFound(_) => ApiError::not_found("dead_letter_not_found", e.to_string()),
            ReplayError::Failed { .. } => ApiError::unprocessable("replay_failed", e.to_string()),
            ReplayError::Stream(detail) => dead_letter_stream_unavailable(detail),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct Replayed {
    replayed: DeadLetter,
}

/// Applies a dead letter again; once applied it leaves the list.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", params(("id" = String, Path, description = "dead letter id (digits)")),
    responses((status = 200, body = Replayed), (status = 404, body = ErrorBody), (status = 422, description = "replay_failed: the letter stays", body = ErrorBody)))]
async fn replay_dead_letter(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<axum::Json<Replayed>, ApiError> {
    let id = parse_letter_id(&id)?;
    Ok(axum::Json(Replayed {
        replayed: dlq::replay(&ctx, id).await?,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct TaxQuery {
    /// The account.
    account_id: String,
    /// 1..=1000, default 1000.
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Where a page of tax records ends: the last record's payment time and
/// payout id (`<RFC 3339 time>~<payout id>`), opaque to clients.
fn tax_cursor(paid_at: chrono::DateTime<chrono::Utc>, payout_id: &str) -> String {
    format!(
        "{}~{payout_id}",
        paid_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

fn parse_tax_cursor(cursor: &str) -> Result<(chrono::DateTime<chrono::Utc>, String), ApiError> {
    let invalid = || ApiError::bad_request("invalid_cursor", "cursor is not one this API returned");
    let (at, payout_id) = cursor.split_once('~').ok_or_else(invalid)?;
    let at = chrono::DateTime::parse_from_rfc3339(at).map_err(|_| invalid())?;
    if payout_id.is_empty() || payout_id.len() > 200 {
        return Err(invalid());
    }
    Ok((at.with_timezone(&chrono::Utc), payout_id.to_owned()))
}

#[derive(Debug, Serialize, ToSchema)]
struct TaxRecord {
    payout_id: String,
    account_id: String,
    #[schema(value_type = String)]
    gross: common::Won,
    #[schema(value_type = String)]
    tax: common::Won,
    #[schema(value_type = String)]
    net: common::Won,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
struct TaxRecords {
    tax_records: Vec<TaxRecord>,
    /// Cursor of the next page; null on the last page.
    next_cursor: Option<String>,
}

/// Tax withheld on an account's interest payouts, newest first, in pages
/// (keyset on payment time and payout id).
#[utoipa::path(get, path = "/v1/tax-records", params(TaxQuery), responses((status = 200, body = TaxRecords), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn tax_records(
    State(ctx): State<Context>,
    Query(q): Query<TaxQuery>,
) -> Result<axum::Json<TaxRecords>, ApiError> {
    let account = AccountId::parse(q.account_id)
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let limit = common::http::page_limit(q.limit, 1000, 1000)?;
    let (before_at, before_id) = match q.cursor.as_deref().map(parse_tax_cursor).transpose()? {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    let rows = ctx
        .db
        .query_all_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "SELECT payout_id, account_id, gross, tax, net, recorded_at, paid_at FROM tax_records \
             WHERE account_id = $1 \
               AND ($2::timestamptz IS NULL OR (paid_at, payout_id) < ($2::timestamptz, $3::text)) \
             ORDER BY paid_at DESC, payout_id DESC LIMIT $4",
            [
                account.to_string().into(),
                before_at.into(),
                before_id.into(),
                (limit as i64).into(),
            ],
        ))
        .await
        .map_err(|e| ApiError::database(&e))?;
    let next_cursor = match rows.last() {
        Some(last) if rows.len() as u64 == limit => {
            let paid_at: chrono::DateTime<chrono::Utc> = last
                .try_get("", "paid_at")
                .map_err(|e| ApiError::internal(&e))?;
            let payout_id: String = last
                .try_get("", "payout_id")
                .map_err(|e| ApiError::internal(&e))?;
            Some(tax_cursor(paid_at, &payout_id))
        }
        _ => None,
    };
    let won = |r: &sea_orm::QueryResult, c: &str| -> Result<common::Won, ApiError> {
        let d: Decimal = r.try_get("", c).map_err(|e| ApiError::internal(&e))?;
        common::Won::new(d).map_err(|e| ApiError::internal(&e))
    };
    let mut records = Vec::with_capacity(rows.len());
    for r in &rows {
        records.push(TaxRecord {
            payout_id: r
                .try_get("", "payout_id")
                .map_err(|e| ApiError::internal(&e))?,
            account_id: r
                .try_get("", "account_id")
                .map_err(|e| ApiError::internal(&e))?,
            gross: won(r, "gross")?,
            tax: won(r, "tax")?,
            net: won(r, "net")?,
            recorded_at: r
                .try_get("", "recorded_at")
                .map_err(|e| ApiError::internal(&e))?,
        });
    }
    Ok(axum::Json(TaxRecords {
        tax_records: records,
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_letter_id;

    #[test]
    fn a_dead_letter_id_is_a_positive_integer() {
        assert_eq!(parse_letter_id("1").ok(), Some(1));
        assert_eq!(parse_letter_id("18446744073709551615").ok(), Some(u64::MAX));
        for bad in ["0", "-1", "", "1.5", "abc", "18446744073709551616", " 1"] {
            assert!(parse_letter_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
