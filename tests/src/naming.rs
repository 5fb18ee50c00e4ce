//! Unique, parseable names for the objects a test creates, and the sweep of
//! objects left behind by test processes that died without running `Drop`
//! (SIGKILL, abort, a CI timeout).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const NETNS_PREFIX: &str = "bt-";
pub(crate) const CGROUP_PREFIX: &str = "beamlit-test-";

/// Keeps namespace names short; the kernel does not limit them but humans read them.
const MAX_HINT: usize = 12;

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// Hints are reduced to `[a-z0-9]` so the `-<pid>-<n>` suffix can be parsed back
/// unambiguously by [`cleanup_stale`].
pub(crate) fn sanitize_hint(hint: &str) -> String {
    let s: String = hint
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(MAX_HINT)
        .collect();
    if s.is_empty() { "t".to_string() } else { s }
}

pub(crate) fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn unique_name(prefix: &str, hint: &str) -> String {
    format!(
        "{prefix}{}-{}-{}",
        sanitize_hint(hint),
        std::process::id(),
        next_id()
    )
}

/// The prefix shared by every network namespace this process creates with `hint`
/// (e.g. `bt-svc-1234-`), for leak checks in tests.
pub fn netns_prefix(hint: &str) -> String {
    format!(
        "{NETNS_PREFIX}{}-{}-",
        sanitize_hint(hint),
        std::process::id()
    )
}

/// The prefix shared by every top-level test cgroup this process creates with `hint`.
pub fn cgroup_prefix(hint: &str) -> String {
    format!(
        "{CGROUP_PREFIX}{}-{}-",
        sanitize_hint(hint),
        std::process::id()
    )
}

/// The creator pid of a name made by [`unique_name`], if it has that shape.
pub(crate) fn creator_pid(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let hint = parts.next()?;
    let valid = !hint.is_empty()
        && hint.chars().all(|c| c.is_ascii_alphanumeric())
        && !n.is_empty()
        && n.chars().all(|c| c.is_ascii_digit());
    if !valid {
        return None;
    }
    pid.parse().ok()
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what test processes that no longer exist left behind: namespaces
/// `bt-<hint>-<pid>-<n>` (killing the processes still inside), and cgroups, bpffs
/// pin directories and temp directories `beamlit-test-<hint>-<pid>-<n>`. Only
/// names of exactly that shape with a dead pid are touched, so objects of live
/// test processes (ours or a parallel `cargo test`) are never disturbed.
/// Returns the names it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(names) = crate::netns::list_netns() {
        for name in names {
            if creator_pid(&name, NETNS_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
                let _ = crate::netns::kill_members(&name);
                if crate::netns::delete_by_name(&name).is_ok() {
                    removed.push(name);
                }
            }
        }
    }
    if let Ok(root) = crate::privileges::cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if creator_pid(&name, CGROUP_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
                crate::cgroup::teardown(&entry.path());
                if !entry.path().exists() {
                    removed.push(name);
                }
            }
        }
    }
    // Real nodes' cgroups, in every hierarchy, below this process's own cgroup.
    removed.extend(crate::cluster::real_nodes::sweep_stale_cgroups());
    // Pins keep programs and maps alive after their test died; temp dirs hold
    // routes files and logs.
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if creator_pid(&name, CGROUP_PREFIX).is_some_and(|pid| !pid_alive(pid))
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let name = unique_name(NETNS_PREFIX, "My-Test_42!");
        assert!(name.starts_with(&netns_prefix("My-Test_42!")));
        assert!(name.starts_with("bt-mytest42-"));
        assert_eq!(
            creator_pid(&name, NETNS_PREFIX),
            Some(std::process::id() as i32)
        );
    }

    #[test]
    fn foreign_names_are_not_parsed() {
        assert_eq!(creator_pid("bt-x-12", NETNS_PREFIX), None);
        assert_eq!(creator_pid("bt-a-b-12-3", NETNS_PREFIX), None);
        assert_eq!(creator_pid("bt--12-3", NETNS_PREFIX), None);
        assert_eq!(creator_pid("other-x-12-3", NETNS_PREFIX), None);
        assert_eq!(creator_pid("bt-x-12-3", NETNS_PREFIX), Some(12));
    }

    #[test]
    fn hints_are_bounded() {
        assert_eq!(sanitize_hint(""), "t");
        assert_eq!(sanitize_hint("abcdefghijklmnopqrstuvwxyz").len(), MAX_HINT);
    }
}
