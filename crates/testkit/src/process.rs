//! Server process handling shared by both servers: spawning into a process group of
//! its own, signalling, waiting with a deadline, and the exit watchdog.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// Watchdog that tears a server down when the test process goes away.
///
/// It is a `sh` reading lines from a pipe whose write end only this process holds.
/// Each line names the current server process group (or `none`). At end of file,
/// which happens when the test process exits for whatever reason, it signals that
/// group, waits a moment, kills what is left and removes the server's directory.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

const WATCHDOG_SCRIPT: &str = r#"
pg=none
while read -r line; do pg="$line"; done
if [ "$pg" != none ]; then
  kill -"$1" "$pg" 2>/dev/null
  i=0
  while kill -0 "$pg" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL -- "-$pg" 2>/dev/null
fi
rm -rf -- "$2"
"#;

impl Watchdog {
    /// `signal` is the polite shutdown signal name for the server (`QUIT`, `TERM`).
    pub(crate) fn spawn(dir: &Path, signal: &str) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("leasehold-testkit-watchdog")
            .arg(signal)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own group: a Ctrl-C aimed at the test run must not kill the watchdog.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn the watchdog shell: {e}"));
        let stdin = child.stdin.take();
        Self { child, stdin }
    }

    /// Tell the watchdog which process group to clean up (or none).
    pub(crate) fn watch(&mut self, pgid: Option<u32>) {
        if let Some(stdin) = self.stdin.as_mut() {
            let line = pgid.map_or_else(|| "none".to_owned(), |p| p.to_string());
            // A failed write means the watchdog died; nothing better to do in a test helper.
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// Stop the watchdog without letting it act (the owner cleans up itself).
    pub(crate) fn disarm(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }
}

/// Spawn `cmd` as the leader of a new process group, output appended to `log`.
pub(crate) fn spawn_in_group(mut cmd: Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open server log {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {:?}: {e}", cmd.get_program()))
}

fn pid_of(child: &Child) -> Option<Pid> {
    i32::try_from(child.id()).ok().and_then(Pid::from_raw)
}

pub(crate) fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = pid_of(child) {
        let _ = kill_process(pid, sig);
    }
}

pub(crate) fn signal_group(child: &Child, sig: Signal) {
    if let Some(pid) = pid_of(child) {
        let _ = kill_process_group(pid, sig);
    }
}

/// Wait (blocking the thread) up to `timeout` for the child to exit.
pub(crate) fn wait_blocking(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Wait (asynchronously) up to `timeout` for the child to exit.
pub(crate) async fn wait_async(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Stop a server for good: polite signal, a short grace period, then SIGKILL to the
/// whole group so no child process survives.
pub(crate) fn shutdown_blocking(child: &mut Child, polite: Signal) {
    if matches!(child.try_wait(), Ok(None)) {
        signal(child, polite);
        if !wait_blocking(child, Duration::from_secs(5)) {
            signal_group(child, Signal::KILL);
            let _ = child.wait();
        }
    }
    // The leader is gone; make sure no straggler of its group is.
    signal_group(child, Signal::KILL);
}

/// Look up a system user's uid and gid in /etc/passwd.
pub(crate) fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// Change the owner of `path` and everything below it.
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
