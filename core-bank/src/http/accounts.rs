//! Customers and accounts.

use axum::extract::State;
use axum::http::StatusCode;
use common::http::{ApiError, ErrorBody, Json, Path, Query};
use common::{AccountId, CustomerId, Won};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{AppState, parse_id};
use crate::accounts::{self, AccountChanges, AccountsError, CustomerStatus};
use crate::store::{account, customer};

/// Longest customer name, in characters.
const MAX_NAME_CHARS: usize = 100;

impl From<AccountsError> for ApiError {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::CustomerNotFound => {
                ApiError::not_found("customer_not_found", "no such customer")
            }
            AccountsError::AccountNotFound => {
                ApiError::not_found("account_not_found", "no such account")
            }
            AccountsError::BalanceNotZero => {
                ApiError::unprocessable("balance_not_zero", e.to_string())
            }
            AccountsError::AccountClosed => {
                ApiError::unprocessable("account_closed", e.to_string())
            }
            AccountsError::Db(db) => ApiError::database(&db),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateCustomer {
    /// 1 to 100 characters.
    name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchCustomer {
    status: CustomerStatus,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CustomerView {
    customer_id: String,
    name: String,
    status: String,
}

impl From<customer::Model> for CustomerView {
    fn from(m: customer::Model) -> Self {
        Self {
            customer_id: m.customer_id,
            name: m.name,
            status: m.status,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateAccount {
    #[schema(value_type = String)]
    customer_id: CustomerId,
}

/// An account as API.md shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    /// Id.
    pub account_id: String,
    /// Owner.
    pub customer_id: String,
    /// Balance in whole won.
    #[schema(value_type = String)]
    pub balance: Won,
    /// Sequence number of the latest entry.
    pub last_seq: i64,
    /// `active`, `suspended` or `closed`.
    pub status: String,
    /// Refuses incoming money.
    pub deposit_stopped: bool,
    /// Refuses outgoing money.
    pub withdrawal_stopped: bool,
}

impl TryFrom<account::Model> for AccountView {
    type Error = ApiError;

    /// A stored balance that is not whole won (the column's scale makes it
    /// impossible) is an internal error, never shown as some other figure.
    fn try_from(m: account::Model) -> Result<Self, ApiError> {
        let balance = Won::new(m.balance).map_err(|e| ApiError::internal(&e))?;
        Ok(Self {
            account_id: m.account_id,
            customer_id: m.customer_id,
            balance,
            last_seq: m.last_seq,
            status: m.status,
            deposit_stopped: m.deposit_stopped,
            withdrawal_stopped: m.withdrawal_stopped,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AccountList {
    accounts: Vec<AccountView>,
    /// Pass as `after` to get the next page; null at the end.
    next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only this customer's accounts.
    customer_id: Option<String>,
    /// Accounts with ids after this one.
    after: Option<String>,
    /// 1..=1000, default 100.
    limit: Option<u64>,
}

/// Opens a customer record.
#[utoipa::path(post, path = "/v1/customers", request_body = CreateCustomer,
    responses((status = 201, body = CustomerView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn create_customer(
    State(s): State<AppState>,
    Json(body): Json<CreateCustomer>,
) -> Result<(StatusCode, axum::Json<CustomerView>), ApiError> {
    let name = body.name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "name must be 1 to 100 printable characters",
        ));
    }
    let c = accounts::create_customer(&s.db, name).await?;
    Ok((StatusCode::CREATED, axum::Json(c.into())))
}

/// Sets a customer's status (protected states block interest payouts).
#[utoipa::path(patch, path = "/v1/customers/{id}", request_body = PatchCustomer,
    params(("id" = String, Path, description = "customer id")),
    responses((status = 200, body = CustomerView), (status = 404, body = ErrorBody)))]
pub(super) async fn patch_customer(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PatchCustomer>,
) -> Result<axum::Json<CustomerView>, ApiError> {
    let id: CustomerId = parse_id(&id)?;
    let c = accounts::set_customer_status(&s.db, &id, body.status).await?;
    Ok(axum::Json(c.into()))
}

/// Opens an account for a customer.
#[utoipa::path(post, path = "/v1/accounts", request_body = CreateAccount,
    responses((status = 201, body = AccountView), (status = 404, body = ErrorBody)))]
pub(super) async fn create_account(
    State(s): State<AppState>,
    Json(body): Json<CreateAccount>,
) -> Result<(StatusCode, axum::Json<AccountView>), ApiError> {
    let a = accounts::open_account(&s.db, &body.customer_id, s.clock.today()).await?;
    Ok((StatusCode::CREATED, axum::Json(a.try_into()?)))
}

/// Lists accounts by id (keyset pages), optionally of one customer.
#[utoipa::path(get, path = "/v1/accounts", params(ListQuery),
    responses((status = 200, body = AccountList), (status = 400, body = ErrorBody)))]
pub(super) async fn list_accounts(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<AccountList>, ApiError> {
    let limit = common::http::page_limit(q.limit, 100, 1000)?;
    let customer: Option<CustomerId> = q.customer_id.as_deref().map(parse_id).transpose()?;
    let after: Option<AccountId> = q.after.as_deref().map(parse_id).transpose()?;
    let rows = accounts::list_accounts(&s.db, customer.as_ref(), after.as_ref(), limit).await?;
    let next_after = if rows.len() as u64 == limit {
        rows.last().map(|a| a.account_id.clone())
    } else {
        None
    };
    Ok(axum::Json(AccountList {
        accounts: rows
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?,
        next_after,
    }))
}

/// Reads an account.
#[utoipa::path(get, path = "/v1/accounts/{id}", params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = AccountView), (status = 404, body = ErrorBody)))]
pub(super) async fn get_account(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<AccountView>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    Ok(axum::Json(
        accounts::get_account(&s.db, &id).await?.try_into()?,
    ))
}

/// Changes an account's status or stops. Closing needs a zero balance;
/// closed is final.
#[utoipa::path(patch, path = "/v1/accounts/{id}", request_body = AccountChanges,
    params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = AccountView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn patch_account(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<AccountChanges>,
) -> Result<axum::Json<AccountView>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    if body.status.is_none() && body.deposit_stopped.is_none() && body.withdrawal_stopped.is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "give at least one of status, deposit_stopped, withdrawal_stopped",
        ));
    }
    let a = accounts::change_account(&s.db, &id, body).await?;
    s.interest
        .cache()
        .invalidate_now(std::slice::from_ref(&id))
        .await;
    Ok(axum::Json(a.try_into()?))
}
