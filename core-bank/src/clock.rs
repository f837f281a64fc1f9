//! The business clock.
//!
//! The business date is the calendar date in the bank's time zone (Asia/Seoul
//! by default). With `BANK_TEST_CLOCK=1` an operator or a test may move it
//! forward (`POST /v1/admin/clock`); the date set is stored in the database so
//! every replica agrees, and each replica refreshes it every second. It never
//! moves backwards: the business date is the later of the real date and the
//! date set.

use std::sync::Arc;
use std::sync::RwLock;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
pub use common::time::truncate_micros;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};

/// Why the clock could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// Moving the clock is disabled (`BANK_TEST_CLOCK` is not `1`).
    #[error("the business clock can only be set when BANK_TEST_CLOCK=1")]
    Disabled,
    /// The requested date is before the current business date.
    #[error("the business date cannot move backwards (today is {today})")]
    Backwards {
        /// The business date in force.
        today: NaiveDate,
    },
    /// The requested date is further ahead of the real date than a test
    /// needs ([`MAX_DAYS_AHEAD`]).
    #[error(
        "the business date can be moved at most {MAX_DAYS_AHEAD} days past the real date ({real})"
    )]
    TooFar {
        /// The real date.
        real: NaiveDate,
    },
    /// The database failed.
    #[error("business clock storage")]
    Db(#[from] DbErr),
}

/// How far past the real date a test may move the business date (ten years).
pub const MAX_DAYS_AHEAD: i64 = 3_660;

/// Why the stored business date could not be followed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The database failed.
    #[error("reading the business clock")]
    Db(#[from] DbErr),
    /// The database holds a date moved ahead with `BANK_TEST_CLOCK=1`, and
    /// this process runs without it: it does not follow that date, and
    /// refuses to start on it.
    #[error(
        "the business date stored in this database ({stored}) is ahead of the real date ({real}): it was moved with BANK_TEST_CLOCK=1, so this is a test database; without BANK_TEST_CLOCK=1 the core does not run on it"
    )]
    MovedByATestClock {
        /// The stored date.
        stored: NaiveDate,
        /// The real date.
        real: NaiveDate,
    },
}

/// The business clock of one process.
#[derive(Debug, Clone)]
pub struct Clock {
    tz: Tz,
    settable: bool,
    set_date: Arc<RwLock<Option<NaiveDate>>>,
}

impl Clock {
    /// A clock in `tz`; `settable` enables moving it.
    pub fn new(tz: Tz, settable: bool) -> Self {
        Self {
            tz,
            settable,
            set_date: Arc::new(RwLock::new(None)),
        }
    }

    /// The time zone of business dates.
    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// The current instant, at the database's precision (microseconds), so
    /// an answer computed now equals the same answer read back later.
    pub fn now(&self) -> DateTime<Utc> {
        common::time::now_micros()
    }

    /// The calendar date in the bank's time zone.
    fn real_today(&self) -> NaiveDate {
        Utc::now().with_timezone(&self.tz).date_naive()
    }

    /// The business date in force.
    pub fn today(&self) -> NaiveDate {
        let real = self.real_today();
        let set = self.set_date.read().map(|g| *g).unwrap_or(None);
        match set {
            Some(d) if d > real => d,
            _ => real,
        }
    }

    /// Seconds until the next local midnight of the real clock (for cache
    /// expiry), at least 1.
    pub fn secs_until_midnight(&self) -> u64 {
        let now = Utc::now().with_timezone(&self.tz);
        let tomorrow = now
            .date_naive()
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0));
        let secs = tomorrow
            .and_then(|t| t.and_local_timezone(self.tz).earliest())
            .map(|t| (t.with_timezone(&Utc) - Utc::now()).num_seconds())
            .unwrap_or(86_400);
        secs.max(1) as u64
    }

    /// Reads the date set in the database (all replicas call this every
    /// second). Without `BANK_TEST_CLOCK=1` a stored date ahead of the real
    /// one is not followed (see [`RefreshError::MovedByATestClock`]).
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<(), RefreshError> {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT today FROM business_clock WHERE id = 1",
            ))
            .await?;
        let date: Option<NaiveDate> = match row {
            Some(r) => r.try_get("", "today")?,
            None => None,
        };
        let real = self.real_today();
        if let Some(stored) = date.filter(|d| !self.settable && *d > real) {
            return Err(RefreshError::MovedByATestClock { stored, real });
        }
        // A refresh that read the row just before a local `set` committed
        // must not undo it when it lands just after.
        self.raise(date);
        Ok(())
    }

    /// Applies a date set here or read from the database, never moving
    /// backwards.
    fn raise(&self, date: Option<NaiveDate>) {
        if let Ok(mut g) = self.set_date.write() {
            *g = (*g).max(date);
        }
    }

    /// Moves the business date forward to `date`.
    pub async fn set(
        &self,
        db: &DatabaseConnection,
        date: NaiveDate,
    ) -> Result<NaiveDate, ClockError> {
        if !self.settable {
            return Err(ClockError::Disabled);
        }
        let today = self.today();
        if date < today {
            return Err(ClockError::Backwards { today });
        }
        let real = self.real_today();
        if (date - real).num_days() > MAX_DAYS_AHEAD {
            return Err(ClockError::TooFar { real });
        }
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE business_clock SET today = GREATEST(COALESCE(today, $1), $1) WHERE id = 1",
            [date.into()],
        ))
        .await?;
        self.raise(Some(date));
        Ok(self.today())
    }

    /// True when the date can be set.
    pub fn is_settable(&self) -> bool {
        self.settable
    }
}
