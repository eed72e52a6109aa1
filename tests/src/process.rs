//! Child processes of a test or of the benchmark (the control plane, Envoy, wrk) and
//! what they print. Every child is tied to the thread that started it and is stopped
//! by its own PID, never by name: an interrupted run leaves nothing behind, and
//! parallel tests (or anyone else's processes) are left alone.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Makes `command`'s process get SIGKILL when the thread that spawns it exits
/// (`PR_SET_PDEATHSIG`).
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing, as code
    // between fork and exec must.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// Stops `child`: SIGTERM, then SIGKILL if it is still running after `grace`; reaps it
/// either way. SIGTERM first, so a server flushes and removes its socket as in
/// production.
pub fn stop_gracefully(mut child: Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signalling our own child by its PID, which it keeps until reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The `host:port` a starting `agent-vault server` announces on the first line of its
/// stdout (`… http://ADDR …` or `https://ADDR`), waiting up to `timeout`; `None` if it did not. The rest
/// of its stdout is drained so the server never blocks on a full pipe.
pub fn announced_address(child: &mut Child, timeout: Duration) -> Option<String> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let line = rx.recv_timeout(timeout).unwrap_or_default();
    line.split("://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// The last `lines` lines of `text` (a log), for failure messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A process's resident memory (`VmRSS` of `/proc/PID/status`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no VmRSS for process {pid}"))
}
