//! CPU time spent by each part of the stack during a benchmark scenario, read
//! from `/proc` (Linux only): how many milliseconds of CPU one operation costs
//! in each process, and how busy the machine was. On a machine whose cores are
//! shared by every process, this is what bounds the throughput: a scenario
//! that needs `c` ms of CPU per operation cannot run faster than
//! `cores * 1000 / c` operations a second, however the work is scheduled.

// Milliseconds and shares of a measurement, never money.
#![allow(clippy::float_arithmetic)]

use std::time::Instant;

/// Which processes make up one part of the stack.
#[derive(Debug, Clone)]
pub enum Who {
    /// One process (all its threads).
    Pid(u32),
    /// Every process whose command name is this, plus the CPU time of the
    /// children their parent has already reaped, so that connections that
    /// end during the window (PostgreSQL backends) still count.
    Named(&'static str),
    /// The calling process (the load generator).
    Myself,
}

/// One part of the stack, by name.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: &'static str,
    pub who: Who,
}

/// CPU ticks of every part and of the whole machine at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    parts: Vec<u64>,
    machine: MachineTicks,
}

#[derive(Debug, Clone, Copy, Default)]
struct MachineTicks {
    busy: u64,
    steal: u64,
    total: u64,
}

/// What a window between two samples cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    /// Milliseconds of CPU per part, in the order of the parts.
    pub parts_ms: Vec<(&'static str, f64)>,
    /// Wall-clock seconds of the window.
    pub secs: f64,
    /// Share of the machine's CPU time that was busy (not idle nor waiting
    /// for I/O), 0-1.
    pub busy: f64,
    /// Share stolen by the hypervisor, 0-1 (a shared VM's neighbours).
    pub steal: f64,
}

impl Usage {
    /// Total milliseconds of CPU of the measured parts.
    pub fn total_ms(&self) -> f64 {
        self.parts_ms.iter().map(|(_, ms)| ms).sum()
    }

    /// `4.10 ms (PostgreSQL 1.50, core-bank 1.00, ...); machine busy 97%,
    /// steal 1%` per operation: the parts that took at least 2% of the
    /// total, in decreasing order, with three decimals below 0.1 ms.
    pub fn per_op(&self, ops: usize) -> String {
        let n = ops.max(1) as f64;
        let total = self.total_ms() / n;
        let mut parts: Vec<(&str, f64)> = self
            .parts_ms
            .iter()
            .map(|(name, ms)| (*name, ms / n))
            .filter(|(_, ms)| *ms >= total * 0.02 && *ms > 0.0)
            .collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        let listed: Vec<String> = parts
            .iter()
            .map(|(name, ms)| format!("{name} {}", ms_text(*ms)))
            .collect();
        format!(
            "{} ms ({}); machine busy {:.0}%, steal {:.0}%",
            ms_text(total),
            listed.join(", "),
            self.busy * 100.0,
            self.steal * 100.0
        )
    }
}

/// Two decimals, or three below 0.1.
fn ms_text(ms: f64) -> String {
    if ms < 0.1 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.2}")
    }
}

/// Milliseconds per clock tick, the unit of `/proc` CPU times: 100 ticks a
/// second on every Linux this runs on (`getconf CLK_TCK`).
const TICK_MS: f64 = 10.0;

/// Reads CPU time of the parts of the stack.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    parts: Vec<Part>,
}

impl CpuMeter {
    pub fn new(parts: Vec<Part>) -> Self {
        Self { parts }
    }

    pub fn sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            parts: self.parts.iter().map(|p| ticks_of(&p.who)).collect(),
            machine: machine_ticks(),
        }
    }

    /// The CPU spent between `from` and now.
    pub fn since(&self, from: &Sample) -> Usage {
        let to = self.sample();
        let total = to.machine.total.saturating_sub(from.machine.total).max(1) as f64;
        Usage {
            parts_ms: self
                .parts
                .iter()
                .zip(to.parts.iter().zip(&from.parts))
                .map(|(p, (t, f))| (p.name, t.saturating_sub(*f) as f64 * TICK_MS))
                .collect(),
            secs: to.at.duration_since(from.at).as_secs_f64(),
            busy: to.machine.busy.saturating_sub(from.machine.busy) as f64 / total,
            steal: to.machine.steal.saturating_sub(from.machine.steal) as f64 / total,
        }
    }
}

/// `(comm, ppid, utime + stime, cutime + cstime)` of one `/proc/<pid>/stat`.
fn stat(path: &str) -> Option<(String, u32, u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may hold spaces; the fields
    // after the last ')' are space separated, starting with the state (3).
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ppid = u32::try_from(field(4)?).ok()?;
    Some((comm, ppid, field(14)? + field(15)?, field(16)? + field(17)?))
}

fn ticks_of(who: &Who) -> u64 {
    match who {
        Who::Pid(pid) => stat(&format!("/proc/{pid}/stat")).map_or(0, |s| s.2),
        Who::Myself => stat("/proc/self/stat").map_or(0, |s| s.2),
        Who::Named(name) => {
            let Ok(dir) = std::fs::read_dir("/proc") else {
                return 0;
            };
            let procs: Vec<(u32, String, u32, u64, u64)> = dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let (comm, ppid, own, reaped) = stat(&format!("/proc/{pid}/stat"))?;
                    Some((pid, comm, ppid, own, reaped))
                })
                .filter(|p| p.1 == *name)
                .collect();
            let own: u64 = procs.iter().map(|p| p.3).sum();
            // Reaped children count at their parent: the processes of this
            // name whose parent is not one of them (the postmaster).
            let reaped: u64 = procs
                .iter()
                .filter(|p| !procs.iter().any(|q| q.0 == p.2))
                .map(|p| p.4)
                .sum();
            own + reaped
        }
    }
}

fn machine_ticks() -> MachineTicks {
    let Some(line) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    else {
        return MachineTicks::default();
    };
    // cpu user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return MachineTicks::default();
    }
    let total: u64 = v.iter().sum();
    MachineTicks {
        busy: total - v[3] - v[4] - v[7],
        steal: v[7],
        total,
    }
}

/// Milliseconds one `write` + `fsync` of a small record takes on the disk
/// holding `dir`, over `n` of them in a row (what a JetStream store with
/// `sync_interval: always` or a PostgreSQL commit waits for).
pub fn fsync_ms(dir: &std::path::Path, n: usize) -> std::io::Result<f64> {
    use std::io::Write;
    let path = dir.join(format!("fsync_probe_{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let started = Instant::now();
    for _ in 0..n {
        f.write_all(&[b'x'; 300])?;
        f.sync_all()?;
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0 / n.max(1) as f64;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_of_a_busy_loop_is_counted_for_the_calling_process() {
        let meter = CpuMeter::new(vec![Part {
            name: "me",
            who: Who::Myself,
        }]);
        let before = meter.sample();
        // Spin until 200 ms of this process's CPU time has been counted (a
        // broken reading never gets there and the deadline fails the test).
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        let usage = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let usage = meter.since(&before);
            if usage.parts_ms[0].1 >= 200.0 {
                break usage;
            }
            assert!(Instant::now() < deadline, "no CPU counted: {usage:?}");
        };
        assert!(usage.busy > 0.0, "{usage:?}");
    }

    #[test]
    fn an_fsync_probe_takes_time_and_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("fsync_probe_dir_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ms = fsync_ms(&dir, 20).unwrap();
        let left = std::fs::read_dir(&dir).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ms > 0.0, "{ms}");
        assert_eq!(left, 0);
    }

    #[test]
    fn per_operation_lists_the_parts_by_cost() {
        let usage = Usage {
            parts_ms: vec![
                ("core", 1000.0),
                ("pg", 3000.0),
                ("redis", 1.0),
                ("nats", 90.0),
            ],
            secs: 2.0,
            busy: 0.97,
            steal: 0.01,
        };
        assert_eq!(
            usage.per_op(1000),
            "4.09 ms (pg 3.00, core 1.00, nats 0.090); machine busy 97%, steal 1%"
        );
    }

    #[test]
    fn a_command_name_in_parentheses_with_spaces_parses() {
        let dir = std::env::temp_dir().join(format!("cpu_stat_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("stat");
        std::fs::write(
            &f,
            "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 2 20 0 1 0 1 1 1",
        )
        .unwrap();
        let s = stat(f.to_str().unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s, ("my (odd) name".to_owned(), 1, 10, 7));
    }
}
