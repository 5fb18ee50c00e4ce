use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};

use crate::naming::{NETNS_PREFIX, unique_name};

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    deleted: AtomicBool,
}

impl Netns {
    /// Creates `bt-<hint>-<pid>-<n>` with `lo` up and IPv6 DAD off, so addresses
    /// are usable immediately instead of after ~1 s of duplicate detection.
    pub fn new(hint: &str) -> Result<Self> {
        let name = unique_name(NETNS_PREFIX, hint);
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on, Drop deletes the namespace if setup fails.
        let ns = Self {
            name,
            deleted: AtomicBool::new(false),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(ns)
    }

    /// A handle on a namespace another value owns (by name): dropping it deletes nothing.
    pub fn handle(name: &str) -> Self {
        Self {
            name: name.to_string(),
            deleted: AtomicBool::new(true),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`; add arguments and spawn it (with
    /// [`crate::spawn`] to also place it in a cgroup).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace; returns stdout, or an error carrying
    /// stderr when the command fails.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("Netns::run: empty command")?;
        run_checked(self.cmd(program).args(rest))
    }

    /// `ip -n <name> <args>`: cheaper than `run(["ip", ...])` (no mount namespace).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Writes a sysctl of this namespace (`key` in dotted form).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let bytes = value.as_bytes().to_vec();
        self.enter(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .write_all(&bytes)
        })?
        .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Runs `f` on a fresh thread that has joined this namespace, e.g. to open
    /// sockets from the test process itself without touching the host namespace.
    /// Only the network namespace is switched (not mounts), so paths under /sys
    /// still show the host's view.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        enter_named(&self.name, f)
    }

    /// Deletes the namespace now; idempotent (Drop calls it again).
    pub fn delete(&self) -> Result<()> {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        delete_by_name(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("beamlit-testbed: {e:#}");
        }
    }
}

/// [`Netns::enter`] for a namespace known by name only (one this value does not own).
pub fn enter_named<F, R>(name: &str, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let file = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening netns {name}"))?;
    let handle = std::thread::spawn(move || -> std::io::Result<R> {
        // SAFETY: file is an open namespace fd; setns only affects this thread,
        // which exits right after `f`, so no other code runs in the namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        drop(file);
        Ok(f())
    });
    match handle.join() {
        Ok(r) => r.with_context(|| format!("setns into {name}")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

pub(crate) fn delete_by_name(name: &str) -> Result<()> {
    run_checked(Command::new("ip").args(["netns", "del", name]))
        .map(|_| ())
        .with_context(|| format!("deleting netns {name}"))
}

/// SIGKILLs every process whose network namespace is `name`; for leftovers of
/// dead test processes, whose children would otherwise keep running (and keep
/// the namespace alive) after `ip netns del`. Returns how many were signalled.
pub(crate) fn kill_members(name: &str) -> Result<usize> {
    let target = std::fs::metadata(format!("/run/netns/{name}"))
        .with_context(|| format!("stat netns {name}"))?;
    let me = std::process::id();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes exit while we scan; a vanished entry is simply not a member.
        let Ok(ns) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if ns.dev() == target.dev() && ns.ino() == target.ino() {
            // SAFETY: kill has no memory-safety preconditions.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    Ok(killed)
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_checked(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "name" or "name (id: 3)".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

pub(crate) fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).map_err(|e| anyhow!("{cmd:?}: non-UTF-8 output: {e}"))
}
