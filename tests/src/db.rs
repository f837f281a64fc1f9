//! A fresh PostgreSQL database per test.

use sea_orm::{ConnectionTrait, Database, Statement};

/// Creates an empty database named `bank_test_<hint>_<unique>` and returns its
/// URL. Databases are left behind for inspection; `make test` drops the old
/// ones before it runs.
pub async fn fresh_database(hint: &str) -> anyhow::Result<String> {
    let admin_url = crate::pg_admin_url();
    let name = format!(
        "bank_test_{hint}_{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    );
    let admin = Database::connect(admin_url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach PostgreSQL at {admin_url}: {e}"))?;
    admin
        .execute_raw(Statement::from_string(
            admin.get_database_backend(),
            format!("CREATE DATABASE \"{name}\""),
        ))
        .await?;
    admin.close().await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(admin_url);
    Ok(format!("{base}/{name}"))
}

/// Runs one SQL statement on `url` and returns the first column of each row as text.
pub async fn query_strings(url: &str, sql: &str) -> anyhow::Result<Vec<String>> {
    let db = Database::connect(url).await?;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r.try_get_by_index::<String>(0)?);
    }
    db.close().await?;
    Ok(out)
}
