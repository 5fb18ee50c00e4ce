use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A child process that is SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    pid: u32,
    program: String,
    /// Filled by a background thread when stderr was piped and handed to
    /// [`ChildGuard::capture_stderr`] (so a chatty child never blocks on a full pipe).
    stderr_log: Option<Arc<Mutex<Vec<u8>>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

/// Starts `cmd`, placing the child in `cgroup` before it execs, so that even its
/// first instruction (and, with [`crate::Netns::cmd`], the `ip netns exec`
/// wrapper) already runs inside the test cgroup. Stdio is whatever `cmd` says.
pub fn spawn(mut cmd: Command, cgroup: Option<&Path>) -> Result<ChildGuard> {
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
            .context("cgroup path contains NUL")?;
        // SAFETY: the closure only calls async-signal-safe functions (getpid,
        // open, write, close) and does not allocate.
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    Ok(ChildGuard {
        pid: child.id(),
        child: Some(child),
        program,
        stderr_log: None,
        stderr_thread: None,
    })
}

/// Runs `cmd` to completion inside `cgroup`, capturing stdout and stderr. The
/// exit status is not checked: the test decides.
pub fn run_in(cgroup: Option<&Path>, mut cmd: Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd, cgroup)?.wait_with_output()
}

/// Runs between fork and exec: writes our pid to `<cgroup>/cgroup.procs`.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    let mut buf = [0u8; 24];
    // SAFETY: getpid is async-signal-safe.
    let pid = unsafe { libc::getpid() };
    let len = format_decimal(pid as u64, &mut buf);
    // SAFETY: procs is NUL-terminated; buf[..len] is initialised; fd is closed
    // on every path.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, buf.as_ptr().cast(), len);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written != len as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// Allocation-free formatting, usable between fork and exec.
fn format_decimal(mut v: u64, buf: &mut [u8; 24]) -> usize {
    let mut tmp = [0u8; 24];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = tmp[n - 1 - i];
    }
    n
}

impl ChildGuard {
    /// Wraps a child started elsewhere (e.g. by the cluster's process keeper).
    pub(crate) fn from_child(child: Child, program: String) -> Self {
        Self {
            pid: child.id(),
            child: Some(child),
            program,
            stderr_log: None,
            stderr_thread: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The underlying child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Drains the piped stderr in the background; read it with [`Self::stderr_text`].
    pub fn capture_stderr(&mut self) {
        let Some(stderr) = self.child.as_mut().and_then(|c| c.stderr.take()) else {
            return;
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        self.stderr_thread = Some(spawn_drain(stderr, Arc::clone(&log)));
        self.stderr_log = Some(log);
    }

    /// What [`Self::capture_stderr`] collected so far (empty if not capturing).
    pub fn stderr_text(&self) -> String {
        self.stderr_log
            .as_ref()
            .map(|log| {
                String::from_utf8_lossy(&log.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
            })
            .unwrap_or_default()
    }

    /// Sends `sig` unless the child was already reaped (its pid may be reused).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} ({}) already reaped", self.program, self.pid);
        };
        if child.try_wait()?.is_some() {
            bail!("{} ({}) already exited", self.program, self.pid);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({}, {sig})", self.pid));
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            // Fails only if it already exited, which is what we want anyway.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("waiting for {}", self.program))?;
        }
        Ok(())
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} already reaped", self.program),
        }
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Waits for exit and collects piped stdout/stderr (plus anything
    /// [`Self::capture_stderr`] collected).
    pub fn wait_with_output(mut self) -> Result<Output> {
        let child = self.child.take().context("child already reaped")?;
        let mut out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.program))?;
        self.merge_captured_stderr(&mut out);
        Ok(out)
    }

    /// Like [`Self::wait_with_output`], but SIGKILLs the child and fails once
    /// `timeout` has passed.
    pub fn wait_with_output_timeout(mut self, timeout: Duration) -> Result<Output> {
        let child = self.child.as_mut().context("child already reaped")?;
        let stdout = child.stdout.take().map(spawn_reader);
        let stderr = child.stderr.take().map(spawn_reader);
        let status = self.wait_timeout(timeout)?;
        let Some(status) = status else {
            let _ = self.kill();
            let stderr = collect(stderr);
            bail!(
                "{} ({}) did not finish within {timeout:?}; stderr: {}",
                self.program,
                self.pid,
                String::from_utf8_lossy(&stderr).trim()
            );
        };
        self.child = None;
        let mut out = Output {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
        };
        self.merge_captured_stderr(&mut out);
        Ok(out)
    }

    fn merge_captured_stderr(&mut self, out: &mut Output) {
        if let Some(handle) = self.stderr_thread.take() {
            // Bounded: a grandchild may still hold the pipe open.
            let deadline = Instant::now() + PIPE_GRACE;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        out.stderr.extend_from_slice(self.stderr_text().as_bytes());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("beamlit-testbed: {e:#}");
        }
    }
}

/// A channel rather than a join handle: a grandchild may keep the pipe open
/// after the child died, and the caller must not block on it forever.
fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

const PIPE_GRACE: Duration = Duration::from_secs(2);

fn collect(rx: Option<Receiver<Vec<u8>>>) -> Vec<u8> {
    rx.and_then(|rx| rx.recv_timeout(PIPE_GRACE).ok())
        .unwrap_or_default()
}

fn spawn_drain(mut stderr: ChildStderr, log: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        let mut buf = [0u8; 24];
        for v in [0u64, 7, 10, 4_194_304, u64::MAX] {
            let n = format_decimal(v, &mut buf);
            assert_eq!(
                std::str::from_utf8(&buf[..n]).ok(),
                Some(v.to_string().as_str())
            );
        }
    }
}
