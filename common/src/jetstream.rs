//! JetStream setup: connecting, and the streams of API.md.
//!
//! Each service creates (or updates) the streams it publishes to at start-up.
//! All streams use file storage and a two-minute duplicate window, so a
//! message re-published with the same `Nats-Msg-Id` within two minutes (a relay
//! that crashed after publishing and before marking its row) is dropped.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// Name of the stream of ledger entries.
pub const LEDGER_STREAM: &str = "LEDGER";
/// Name of the stream of transfer status events.
pub const TRANSFERS_STREAM: &str = "TRANSFERS";
/// Name of the stream of interest payouts.
pub const INTEREST_STREAM: &str = "INTEREST";
/// Name of the stream of operational alerts.
pub const ALERTS_STREAM: &str = "ALERTS";
/// Name of the dead-letter stream.
pub const DLQ_STREAM: &str = "DLQ";

/// Duplicate window of every stream: at least two minutes (API.md).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A stream this system defines.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// Subjects captured by the stream.
    pub subjects: &'static [&'static str],
    /// What the stream holds.
    pub description: &'static str,
    /// How long messages are kept (zero: forever).
    pub max_age: Duration,
    /// When set, the stream holds at most this many bytes and, once full,
    /// refuses new messages instead of dropping old ones (a publisher keeps
    /// what it could not publish and retries).
    pub max_bytes: Option<i64>,
}

/// `LEDGER`: `bank.ledger.<account_id>`, kept for 30 days (longer than any
/// consumer outage we plan to recover from by replay; older gaps are filled
/// from the core's entries API).
pub const LEDGER: StreamSpec = StreamSpec {
    name: LEDGER_STREAM,
    subjects: &["bank.ledger.*"],
    description: "Ledger entries of the core bank, one subject per account",
    max_age: Duration::from_secs(30 * 86_400),
    max_bytes: None,
};
/// `TRANSFERS`: transfer status events of the channel.
pub const TRANSFERS: StreamSpec = StreamSpec {
    name: TRANSFERS_STREAM,
    subjects: &["bank.transfer.*"],
    description: "Transfer requested/succeeded/failed events of the transfer service",
    max_age: Duration::from_secs(30 * 86_400),
    max_bytes: None,
};
/// `INTEREST`: interest payouts.
pub const INTEREST: StreamSpec = StreamSpec {
    name: INTEREST_STREAM,
    subjects: &["bank.interest.*"],
    description: "Interest payouts of the core bank",
    max_age: Duration::from_secs(30 * 86_400),
    max_bytes: None,
};
/// `ALERTS`: shadow verification mismatches and other alerts.
pub const ALERTS: StreamSpec = StreamSpec {
    name: ALERTS_STREAM,
    subjects: &["bank.alert.*"],
    description: "Operational alerts such as interest shadow mismatches",
    max_age: Duration::from_secs(30 * 86_400),
    max_bytes: None,
};
/// `DLQ`: dead letters, kept until replayed or deleted by an operator, up to
/// [`DLQ_MAX_BYTES`]; a full DLQ refuses new letters, and the projector keeps
/// retrying their messages (naked with backoff) until there is room, so a
/// storm of bad messages cannot fill the disk and no letter is dropped.
pub const DLQ: StreamSpec = StreamSpec {
    name: DLQ_STREAM,
    subjects: &["bank.dlq.>"],
    description: "Messages the projector could not apply, with the error in headers",
    max_age: Duration::ZERO,
    max_bytes: Some(DLQ_MAX_BYTES),
};

/// Size bound of the `DLQ` stream: 1 GiB.
pub const DLQ_MAX_BYTES: i64 = 1 << 30;

/// Credentials written into a NATS URL (`nats://user:password@host` or
/// `nats://token@host`), percent-decoded.
#[derive(PartialEq, Eq)]
enum UrlCredentials {
    UserAndPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlCredentials::UserAndPassword(user, _) => {
                write!(f, "UserAndPassword({user:?}, <hidden>)")
            }
            UrlCredentials::Token(_) => f.write_str("Token(<hidden>)"),
        }
    }
}

/// Splits the credentials out of a (comma-separated) NATS server list: the
/// client is given them as options and the servers without them, because
/// the client does not read credentials from its server URLs and logs those
/// URLs, password included, at debug level on every connection attempt.
fn split_credentials(servers: &str) -> (String, Option<UrlCredentials>) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut credentials = None;
    let plain: Vec<String> = servers
        .split(',')
        .map(str::trim)
        .map(|server| {
            let Ok(mut url) = url::Url::parse(server) else {
                return server.to_owned();
            };
            if url.username().is_empty() {
                return server.to_owned();
            }
            let found = match url.password() {
                Some(password) => {
                    UrlCredentials::UserAndPassword(decode(url.username()), decode(password))
                }
                None => UrlCredentials::Token(decode(url.username())),
            };
            credentials.get_or_insert(found);
            // Cannot fail: the URL has a host, since it had credentials.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        })
        .collect();
    (plain.join(","), credentials)
}

/// Connects to NATS. The client reconnects by itself forever; publishes made
/// while disconnected fail with a timeout and are retried by the caller.
/// Credentials in `url` are passed to the client as options (see
/// [`split_credentials`]).
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let (servers, credentials) = split_credentials(url);
    let options = match credentials {
        Some(UrlCredentials::UserAndPassword(user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some(UrlCredentials::Token(token)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    };
    options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        })
        .connect(servers.as_str())
        .await
}

/// The stream configuration of a spec.
pub fn stream_config(spec: &StreamSpec, replicas: usize) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: match spec.max_bytes {
            Some(_) => stream::DiscardPolicy::New,
            None => stream::DiscardPolicy::Old,
        },
        max_bytes: spec.max_bytes.unwrap_or(-1),
        duplicate_window: DUPLICATE_WINDOW,
        max_age: spec.max_age,
        num_replicas: replicas.max(1),
        allow_direct: true,
        ..Default::default()
    }
}

/// A stream could not be read, created or brought to its configuration.
#[derive(Debug, thiserror::Error)]
#[error("ensuring stream {stream}")]
pub struct EnsureStreamError {
    /// The stream.
    pub stream: &'static str,
    /// What the server answered.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Creates each stream that is missing, and brings each existing one to the
/// settings this code relies on, without ever lowering what protects the
/// messages: replicas, retention (`max_age`, `max_bytes`) and the duplicate
/// window keep an existing stream's value where it is higher (zero or -1:
/// unlimited), so a process started with a smaller `NATS_STREAM_REPLICAS`
/// (an operator's command run without the production settings, an older
/// replica) or an operator's longer retention is not undone. Lowering them
/// is for an operator, by hand (`nats stream edit`).
pub async fn ensure_streams(
    js: &jetstream::Context,
    specs: &[StreamSpec],
    replicas: usize,
) -> Result<(), EnsureStreamError> {
    for spec in specs {
        ensure_stream(js, spec, replicas)
            .await
            .map_err(|source| EnsureStreamError {
                stream: spec.name,
                source,
            })?;
    }
    Ok(())
}

/// The stream `name` (with its info as of this call), or `None` when the
/// server has no such stream (deleted, or lost with its storage).
pub async fn stream_if_exists(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, jetstream::context::GetStreamError> {
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    replicas: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use jetstream::context::CreateStreamErrorKind;
    let wanted = stream_config(spec, replicas);
    let current = match stream_if_exists(js, spec.name).await? {
        Some(stream) => stream.cached_info().config.clone(),
        None => match js.create_stream(wanted.clone()).await {
            Ok(_) => {
                tracing::info!(stream = spec.name, "stream created");
                return Ok(());
            }
            // Another process created it meanwhile: brought to these
            // settings like any existing one.
            Err(e)
                if matches!(e.kind(), CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
            {
                js.get_stream(spec.name).await?.cached_info().config.clone()
            }
            Err(e) => return Err(e.into()),
        },
    };
    let merged = merged_config(&current, &wanted);
    if merged != current {
        js.update_stream(&merged).await?;
        tracing::info!(stream = spec.name, "stream settings updated");
    }
    Ok(())
}

/// An existing stream's configuration with this code's settings applied
/// (see [`ensure_streams`]): what only the server keeps (its defaults, the
/// storage type and retention policy, which cannot change) is left as it is.
fn merged_config(current: &stream::Config, wanted: &stream::Config) -> stream::Config {
    // Zero (or less) is unlimited, above any limit.
    let longer = |a: Duration, b: Duration| {
        if a.is_zero() || b.is_zero() {
            Duration::ZERO
        } else {
            a.max(b)
        }
    };
    let larger = |a: i64, b: i64| if a <= 0 || b <= 0 { -1 } else { a.max(b) };
    if current.num_replicas > wanted.num_replicas {
        tracing::warn!(
            stream = %wanted.name,
            current = current.num_replicas,
            configured = wanted.num_replicas,
            "the stream has more replicas than NATS_STREAM_REPLICAS; they are kept (lower them by hand if that is meant)"
        );
    }
    let mut merged = current.clone();
    merged.description = wanted.description.clone();
    merged.subjects = wanted.subjects.clone();
    merged.discard = wanted.discard;
    merged.allow_direct = wanted.allow_direct;
    merged.num_replicas = current.num_replicas.max(wanted.num_replicas);
    merged.max_age = longer(current.max_age, wanted.max_age);
    merged.max_bytes = larger(current.max_bytes, wanted.max_bytes);
    merged.duplicate_window = current.duplicate_window.max(wanted.duplicate_window);
    merged
}

#[cfg(test)]
mod credential_tests {
    use super::{UrlCredentials, split_credentials};

    #[test]
    fn credentials_are_taken_out_of_every_server_url() {
        assert_eq!(
            split_credentials("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".to_owned(), None)
        );
        let (servers, credentials) =
            split_credentials("nats://bank:p%40ss@nats-a:4222, nats://bank:p%40ss@nats-b:4222");
        assert_eq!(servers, "nats://nats-a:4222,nats://nats-b:4222");
        assert_eq!(
            credentials,
            Some(UrlCredentials::UserAndPassword(
                "bank".into(),
                "p@ss".into()
            ))
        );
        let (servers, credentials) = split_credentials("tls://s3cr3t-token@nats:4222");
        assert_eq!(servers, "tls://nats:4222");
        assert_eq!(
            credentials,
            Some(UrlCredentials::Token("s3cr3t-token".into()))
        );
        assert!(!format!("{credentials:?}").contains("s3cr3t"));
        // Not a URL (the client's own host:port form): passed on as it is.
        assert_eq!(split_credentials("127.0.0.1:4222").0, "127.0.0.1:4222");
    }
}

#[cfg(test)]
mod merge_tests {
    use super::{DLQ, LEDGER, merged_config, stream_config};
    use std::time::Duration;

    #[test]
    fn an_existing_streams_replicas_and_unlimited_retention_are_never_lowered() {
        let mut production = stream_config(&LEDGER, 3);
        production.max_age = Duration::ZERO;
        let merged = merged_config(&production, &stream_config(&LEDGER, 1));
        assert_eq!(merged.num_replicas, 3);
        assert_eq!(merged.max_age, Duration::ZERO, "unlimited stays unlimited");

        let merged = merged_config(&stream_config(&LEDGER, 1), &stream_config(&LEDGER, 3));
        assert_eq!(merged.num_replicas, 3, "raised to the configured replicas");

        let mut unbounded = stream_config(&DLQ, 1);
        unbounded.max_bytes = -1;
        assert_eq!(
            merged_config(&unbounded, &stream_config(&DLQ, 1)).max_bytes,
            -1
        );
    }
}
