//! The service binaries as child processes, for tests that kill them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// `target/<profile>/<name>`: next to the running binary (tools such as
/// `chaos`), or one level up (test binaries live in `deps/`). `make test`
/// builds the binaries first; a missing one fails with the path looked for.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("binary dir");
    let candidates = [
        here.join(name),
        here.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "{} is missing: build the binaries first (cargo build --bins)",
        candidates[1].display()
    );
}

/// A running service binary.
pub struct ServiceProcess {
    name: String,
    env: HashMap<String, String>,
    args: Vec<String>,
    child: Option<Child>,
}

impl ServiceProcess {
    /// Starts `name` with `env` (added to the test's environment).
    pub fn start(name: &str, env: HashMap<String, String>) -> anyhow::Result<Self> {
        Self::start_with_args(name, &[], env)
    }

    /// Starts `name args...` with `env`.
    pub fn start_with_args(
        name: &str,
        args: &[&str],
        env: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            env,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        p.restart()?;
        Ok(p)
    }

    /// Starts it again with the same settings (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let child = Command::new(binary(&self.name))
            .args(&self.args)
            .envs(&self.env)
            .env("RUST_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`); returns the exit code.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        if let Some(pid) = c.id() {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()?;
        }
        let status = tokio::time::timeout(timeout, c.wait()).await??;
        Ok(status.code())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}
