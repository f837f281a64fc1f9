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

/// A command for `program` that is killed when the process that spawns it
/// dies, even by SIGKILL (a test binary killed mid-run must not leave
/// services holding ports and database connections behind).
///
/// It runs under `setpriv --pdeathsig KILL` (util-linux, present on every
/// Debian system), which sets the parent-death signal and then executes
/// `program` in its place, so the pid is the service's. Linux sends that
/// signal when the *thread* that spawned the child exits: spawn from a test's
/// own thread or a runtime worker, never from a short-lived blocking thread.
/// Without `setpriv` the command runs `program` directly.
pub fn dies_with_parent(program: impl AsRef<std::ffi::OsStr>) -> Command {
    const SETPRIV: &str = "/usr/bin/setpriv";
    if std::path::Path::new(SETPRIV).is_file() {
        let mut c = Command::new(SETPRIV);
        c.args(["--pdeathsig", "KILL", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs service binary `name` with `args` and `env` to its exit (a command,
/// `--help`, a start that must fail); an error if it still runs after
/// `within` (it is killed then).
pub async fn run_to_exit(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> anyhow::Result<std::process::Output> {
    let mut command = Command::new(binary(name));
    command
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    match tokio::time::timeout(within, command.output()).await {
        Ok(out) => Ok(out?),
        Err(_) => anyhow::bail!("{name} {args:?} still ran after {within:?}"),
    }
}

/// Sends signal `name` (`TERM`, `STOP`, `CONT`, ...) to process `pid`.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

/// A running service binary.
pub struct ServiceProcess {
    name: String,
    env: HashMap<String, String>,
    args: Vec<String>,
    child: Option<Child>,
    /// Its log lines (stdout, over every start since the first logged one),
    /// when started by [`ServiceProcess::start_logged`] or
    /// [`ServiceProcess::restart_logged`].
    log: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

impl ServiceProcess {
    /// Starts `name` with `env` (added to the test's environment).
    pub fn start(name: &str, env: HashMap<String, String>) -> anyhow::Result<Self> {
        Self::start_with_args(name, &[], env)
    }

    /// Like [`ServiceProcess::start`], keeping its log lines (this start's
    /// and every restart's) for [`ServiceProcess::until_logged`] and
    /// [`ServiceProcess::logged`].
    pub fn start_logged(name: &str, env: HashMap<String, String>) -> anyhow::Result<Self> {
        Self::launch(name, &[], env, Some(Default::default()))
    }

    fn launch(
        name: &str,
        args: &[&str],
        mut env: HashMap<String, String>,
        log: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
    ) -> anyhow::Result<Self> {
        // The Redis the tests use (`TEST_REDIS_URL`), unless told otherwise.
        env.entry("REDIS_URL".to_owned())
            .or_insert_with(crate::redis_url);
        let mut p = Self {
            name: name.to_owned(),
            env,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            log,
        };
        p.restart()?;
        Ok(p)
    }

    /// Starts `name args...` with `env`.
    pub fn start_with_args(
        name: &str,
        args: &[&str],
        env: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        Self::launch(name, args, env, None)
    }

    /// Starts it again (after a kill), keeping its log lines from now on
    /// (at `warn` and above unless `TEST_LOG` says otherwise) for
    /// [`ServiceProcess::until_logged`] and [`ServiceProcess::logged`].
    pub fn restart_logged(&mut self) -> anyhow::Result<()> {
        self.log.get_or_insert_with(Default::default);
        self.restart()
    }

    /// How many of its kept log lines contain `needle` (0 when it keeps none).
    pub fn logged(&self, needle: &str) -> usize {
        self.logged_lines(needle).len()
    }

    /// The kept log lines containing `needle`, over every life (none for a
    /// process that does not keep them).
    pub fn logged_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .as_ref()
            .and_then(|log| {
                log.lock().ok().map(|lines| {
                    lines
                        .iter()
                        .filter(|l| l.contains(needle))
                        .cloned()
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Waits (at most `within`, then fails the test) until a log line
    /// containing `needle` was written; the line. Only for a process that
    /// keeps its log lines.
    pub async fn until_logged(&self, needle: &str, within: Duration) -> String {
        let log = self.log.clone();
        crate::wait::eventually(&format!("{} to log {needle:?}", self.name), within, || {
            let log = log.clone();
            async move {
                let log = log.ok_or("not started by restart_logged")?;
                let lines = log.lock().map_err(|e| e.to_string())?;
                lines
                    .iter()
                    .find(|l| l.contains(needle))
                    .cloned()
                    .ok_or_else(|| format!("{} lines, none with it", lines.len()))
            }
        })
        .await
    }

    /// Starts it again with the same settings (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let level = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let mut child = dies_with_parent(binary(&self.name))
            .args(&self.args)
            .envs(&self.env)
            .env("RUST_LOG", level)
            .stdout(if self.log.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        if let (Some(log), Some(out)) = (&self.log, child.stdout.take()) {
            let log = log.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut kept) = log.lock() {
                        kept.push(line);
                    }
                }
            });
        }
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
            signal(pid, "TERM")?;
        }
        let status = tokio::time::timeout(timeout, c.wait()).await??;
        Ok(status.code())
    }

    /// SIGTERM, and an error unless it drains and exits 0 within 30 s (what
    /// a clean shutdown must do).
    pub async fn terminate_cleanly(&mut self) -> anyhow::Result<()> {
        match self.terminate(Duration::from_secs(30)).await? {
            Some(0) => Ok(()),
            other => anyhow::bail!("exited {other:?} after SIGTERM, not 0"),
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

#[cfg(test)]
mod tests {
    use super::dies_with_parent;
    use std::time::{Duration, Instant};

    /// Running (not a zombie, not gone).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let state = s.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }

    #[test]
    fn a_child_is_killed_when_the_thread_that_spawned_it_ends() {
        // The spawning thread stands for the test binary: when it ends, the
        // kernel sends the child its parent-death signal.
        let pid = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let child = dies_with_parent("sleep").arg("600").spawn().unwrap();
                let pid = child.id().unwrap();
                // Running `sleep` itself (past `setpriv`), so a child that
                // never started cannot pass the test.
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map_or(true, |c| c.trim() != "sleep")
                {
                    assert!(Instant::now() < deadline, "sleep {pid} did not start");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(alive(pid));
                pid
            })
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "sleep {pid} outlived the thread that spawned it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
