use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result, bail};

const BPFFS: &str = "/sys/fs/bpf";

/// Whether privileged tests can run here. Skips (returns false, with a note on
/// stderr) on a developer machine without privileges, but panics when `CI` is
/// set: a CI run that silently skipped every privileged test would look green.
pub fn require_privileges() -> bool {
    match check() {
        Ok(()) => {
            static SWEEP: Once = Once::new();
            SWEEP.call_once(|| {
                let removed = crate::naming::cleanup_stale();
                if !removed.is_empty() {
                    eprintln!(
                        "beamlit-testbed: removed leftovers of dead test processes: {removed:?}"
                    );
                }
            });
            true
        }
        Err(reason) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("privileged tests must run as root in CI: {reason:#}");
            }
            // Straight to fd 2: libtest captures eprintln!, which would hide why
            // the tests "passed". Once per process is enough to explain it.
            static NOTE: Once = Once::new();
            NOTE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping privileged tests: {reason:#} (with CI set this is an error)"
                );
            });
            false
        }
    }
}

fn check() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not running as root");
    }
    ensure_bpffs()?;
    cgroup2_mount()?;
    for tool in ["ip", "nft"] {
        if !on_path(tool) {
            bail!("`{tool}` not found in PATH");
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// One entry of /proc/mounts: (mount point, fs type). Mount points escape
/// whitespace as octal (`\040`).
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some((PathBuf::from(unescape_mount(target)), fstype.to_string()))
        })
        .collect())
}

fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |b: u8| u32::from(b - b'0');
            let v = digit(bytes[i + 1]) * 64 + digit(bytes[i + 2]) * 8 + digit(bytes[i + 3]);
            // Out-of-range escapes (> \377) cannot come from the kernel; keep them literal.
            match u8::try_from(v) {
                Ok(b) => out.push(b),
                Err(_) => out.extend_from_slice(&bytes[i..i + 4]),
            }
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount point (on a hybrid layout, e.g. /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(target, _)| target)
        .context("no cgroup2 filesystem in /proc/mounts")
}

/// The agent pins maps under /sys/fs/bpf, so a missing bpffs is mounted rather
/// than treated as "not privileged".
fn ensure_bpffs() -> Result<()> {
    let bpffs = Path::new(BPFFS);
    if mounts()?
        .iter()
        .any(|(target, fstype)| target == bpffs && fstype == "bpf")
    {
        return Ok(());
    }
    std::fs::create_dir_all(bpffs).with_context(|| format!("creating {BPFFS}"))?;
    let target = CString::new(BPFFS)?;
    let fstype = CString::new("bpf")?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {BPFFS}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount(r"/a\04"), r"/a\04");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
