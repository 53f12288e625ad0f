//! Child processes on loopback: started on ephemeral ports, waited for, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A loopback port that was free a moment ago (the child binds it right after).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh scratch directory for one run's configs, logs and SQLite files.
pub fn scratch_dir(label: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "llm-meter-bench-{label}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// `BENCH_KEEP=1` keeps scratch directories and bench databases for inspection.
pub fn keep_scratch() -> bool {
    std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1")
}

/// Remove a scratch directory unless `BENCH_KEEP=1`.
pub fn remove_scratch(dir: &Path) {
    if keep_scratch() {
        eprintln!("bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Status code of a blocking `GET` (None when unreachable).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.get(9..12)?.parse().ok()
}

/// A blocking `GET` returning the body (for Envoy's admin `/stats`).
pub fn http_get_body(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// A blocking `POST` with `Connection: close`; status and raw body (chunked framing kept).
pub fn http_post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.get(9..12)?.parse().ok()?;
    Some((status, response))
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub log_path: PathBuf,
    child: Child,
}

impl Proc {
    /// Spawn `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> Result<Proc> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        die_with_parent(&mut command);
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            log_path: log_path.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until `GET path` on `port` answers 200, failing early if the process died.
    pub fn wait_ready(&mut self, port: u16, path: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status}; log tail:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if http_status(port, path) == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} not ready on :{port}{path} after {limit:?}; log tail:\n{}",
            self.name,
            self.log_tail(30)
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child gets SIGKILL when the bench dies, even by SIGKILL itself: an interrupted
/// bench leaves no Envoy or sidecar behind.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// CPU time (user + system, seconds) a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// CPU time (seconds) used so far by every live process whose command name is one of
/// `names` (a database server's backends, say); processes that ended are not counted.
pub fn processes_cpu_seconds(names: &[&str]) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.contains(&comm.trim_end()))
        })
        .filter_map(cpu_seconds)
        .sum()
}

/// CPU time the whole machine has spent busy (every process and the kernel: user, nice,
/// system, interrupts, steal), summed over its CPUs, from /proc/stat.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    Some(busy / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux configuration in practice.
    100.0
}

/// Resident memory of a process in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Median time of one 4 KiB write + fdatasync in `dir` (µs): what one durable commit costs
/// this disk at least, the floor under every database transaction that must survive a crash.
pub fn fsync_probe_us(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .ok()?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        file.write_all(&block).ok()?;
        file.sync_data().ok()?;
        samples.push(started.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(&path);
    samples.sort_unstable();
    Some(samples[samples.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_accumulates_busy_time_while_this_process_spins() {
        let before = machine_busy_seconds().expect("/proc/stat readable");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Ticks are 10 ms: spin for several of them.
        while started.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = machine_busy_seconds().expect("/proc/stat readable");
        assert!(after - before >= 0.1, "{before} -> {after}");
        let own = cpu_seconds(std::process::id()).expect("own /proc stat");
        assert!(own > 0.0);
    }

    #[test]
    fn processes_are_found_by_command_name() {
        let comm = std::fs::read_to_string("/proc/self/comm").expect("own comm");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(processes_cpu_seconds(&[comm.trim_end()]) > 0.0);
        assert_eq!(processes_cpu_seconds(&["no-such-command-here"]), 0.0);
    }
}
