//! A dedicated `nats-server` per test, with JetStream, on a free port.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use tokio::process::Child;

/// A running (or stopped) nats-server owned by a test. Killed on drop.
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    fsync_every_write: bool,
    /// User and password the server requires, if any.
    credentials: Option<(String, String)>,
}

/// The nats-server binary: `NATS_SERVER_BIN` (when set and not empty), else
/// the one `make services` unpacked into `.local/bin` (when the installed
/// server is older than 2.10), else `nats-server` from `PATH`.
pub fn binary() -> String {
    if let Ok(b) = std::env::var("NATS_SERVER_BIN")
        && !b.trim().is_empty()
    {
        return b;
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.local/bin/nats-server");
    if local.exists() {
        return local.to_string_lossy().into_owned();
    }
    "nats-server".to_owned()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl NatsServer {
    /// Starts a server with JetStream in a temporary directory, with
    /// `sync_interval: always`, as the project runs it. Fails when the
    /// server is too old for that option (before 2.10) rather than quietly
    /// running a less durable server.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_fsync(true).await
    }

    /// Starts a server whose JetStream fsyncs every write
    /// (`fsync_every_write`, `sync_interval: always`) or keeps the server's
    /// default (fsync every 2 minutes: acknowledged messages can be lost on
    /// power loss). Only the benchmark's `--nats-sync default` uses the
    /// latter, to measure what the fsyncs cost.
    pub async fn start_with_fsync(fsync_every_write: bool) -> anyhow::Result<Self> {
        Self::launch(fsync_every_write, None).await
    }

    /// Starts a server (as [`Self::start`]) that lets in only clients
    /// presenting `user` and `password`.
    pub async fn start_with_credentials(user: &str, password: &str) -> anyhow::Result<Self> {
        Self::launch(true, Some((user.to_owned(), password.to_owned()))).await
    }

    async fn launch(
        fsync_every_write: bool,
        credentials: Option<(String, String)>,
    ) -> anyhow::Result<Self> {
        if fsync_every_write {
            let version = version()?;
            anyhow::ensure!(
                supports_sync_interval(&version),
                "`{}` reports nats-server {version}, which cannot fsync every write \
                 (`sync_interval: always` needs 2.10 or later); run `make services`, \
                 which unpacks Debian's 2.10 into .local/bin, or set NATS_SERVER_BIN",
                binary()
            );
        }
        let dir = std::env::temp_dir().join(crate::unique("bank-nats-"));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port: free_port(),
            dir,
            child: None,
            fsync_every_write,
            credentials,
        };
        s.resume().await?;
        Ok(s)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (same port, same storage) after [`Self::stop`].
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.join("nats.conf");
        let sync = if self.fsync_every_write {
            "  sync_interval: always\n"
        } else {
            ""
        };
        let authorization = match &self.credentials {
            Some((user, password)) => {
                format!("authorization {{\n  user: {user:?}\n  password: {password:?}\n}}\n")
            }
            None => String::new(),
        };
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n{authorization}",
                self.port,
                self.dir.join("js").display()
            ),
        )?;
        let child = crate::process::dies_with_parent(binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start nats-server ({}): {e}", binary()))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("nats-server did not listen on {} within 10 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the server (as a crash would).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// A JetStream context on a fresh connection.
    pub async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        let options = match &self.credentials {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => async_nats::ConnectOptions::new(),
        };
        let client = options.connect(self.url()).await?;
        Ok(jetstream::new(client))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The version the nats-server binary reports (`2.10.27`).
pub fn version() -> anyhow::Result<String> {
    let out = std::process::Command::new(binary())
        .arg("--version")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `{} --version`: {e}", binary()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .trim()
        .trim_start_matches("nats-server:")
        .trim()
        .trim_start_matches('v')
        .to_owned())
}

/// Whether a server of this version knows `sync_interval` (2.10 or later).
fn supports_sync_interval(version: &str) -> bool {
    let nums: Vec<u32> = version.split('.').map_while(|p| p.parse().ok()).collect();
    matches!(nums.as_slice(), [a, b, ..] if (*a, *b) >= (2, 10))
}

/// Every message of a stream, in stream order (deleted ones skipped).
pub async fn stream_messages(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<async_nats::jetstream::message::StreamMessage>> {
    let mut s = js.get_stream(stream).await?;
    let info = s.info().await?.clone();
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        match s.get_raw_message(seq).await {
            Ok(m) => out.push(m),
            // Deleted (or purged meanwhile): not a message any more.
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) => {}
            // Anything else would make a message look absent.
            Err(e) => anyhow::bail!("reading {stream} message {seq}: {e}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::supports_sync_interval;

    #[test]
    fn sync_interval_needs_2_10_or_later() {
        assert!(!supports_sync_interval("2.9.10"));
        assert!(!supports_sync_interval("1.12.0"));
        assert!(!supports_sync_interval(""));
        assert!(!supports_sync_interval("garbage"));
        assert!(supports_sync_interval("2.10.27"));
        assert!(supports_sync_interval("2.15.1"));
        assert!(supports_sync_interval("3.0.0"));
    }
}
