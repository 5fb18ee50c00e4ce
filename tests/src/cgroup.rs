use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::naming::{CGROUP_PREFIX, sanitize_hint, unique_name};

const KILL_DEADLINE: Duration = Duration::from_secs(5);
const RMDIR_ATTEMPTS: u32 = 20;

/// A cgroup v2 directory owned by one test; the only place tests attach eBPF
/// programs to. Dropping it kills every process inside (children included) and
/// removes the directory tree.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/beamlit-test-<hint>-<pid>-<n>`.
    pub fn new(hint: &str) -> Result<Self> {
        let root = crate::privileges::cgroup2_mount()?;
        let path = root.join(unique_name(CGROUP_PREFIX, hint));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// A nested cgroup. Dropping the parent first is fine: the parent's teardown
    /// removes the whole subtree and the child's teardown then finds nothing.
    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        let path = self.path.join(sanitize_hint(name));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id as `bpf_get_current_cgroup_id()` reports it (the kernfs
    /// inode number), for keying eBPF maps.
    pub fn id(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .ino())
    }

    /// Pids directly in this cgroup (not in children).
    pub fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.path)
    }

    /// Whether any process is in this cgroup or its descendants.
    pub fn populated(&self) -> Result<bool> {
        populated(&self.path)
    }

    /// Kills everything in the subtree and waits (bounded) until it is empty,
    /// keeping the directories.
    pub fn kill_all(&self) -> Result<()> {
        let dirs = subtree_post_order(&self.path);
        kill_and_wait(&self.path, &dirs);
        if populated(&self.path)? {
            bail!(
                "cgroup {} still populated after {KILL_DEADLINE:?}",
                self.path.display()
            );
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        teardown(&self.path);
    }
}

fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn populated(dir: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(dir.join("cgroup.events"))
        .with_context(|| format!("reading {}/cgroup.events", dir.display()))?;
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

/// Descendants before their parents, so they can be removed in this order.
fn subtree_post_order(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree_post_order(&entry.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

fn contains_self(dirs: &[PathBuf]) -> bool {
    let me = std::process::id() as i32;
    dirs.iter()
        .any(|d| read_procs(d).is_ok_and(|p| p.contains(&me)))
}

fn kill_and_wait(root: &Path, dirs: &[PathBuf]) {
    let me = std::process::id() as i32;
    // Someone moved the test process itself in: cgroup.kill would kill the test
    // runner, so fall back to signalling the other pids one by one.
    let use_cgroup_kill = !contains_self(dirs);
    if !use_cgroup_kill {
        eprintln!(
            "beamlit-testbed: the test process is inside {}; not killing it",
            root.display()
        );
    }
    let deadline = Instant::now() + KILL_DEADLINE;
    loop {
        if use_cgroup_kill {
            // Recursive, and also catches processes forking while we iterate.
            let _ = std::fs::write(root.join("cgroup.kill"), "1");
        }
        let mut remaining = false;
        for dir in dirs {
            for pid in read_procs(dir).unwrap_or_default() {
                if pid == me {
                    continue;
                }
                remaining = true;
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !remaining && !populated(root).unwrap_or(false) {
            return;
        }
        if !use_cgroup_kill && !remaining {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "beamlit-testbed: cgroup {} still populated after {KILL_DEADLINE:?}",
                root.display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills everything in the cgroup subtree at `root` and removes it. Never fails:
/// it runs in `Drop`; problems are reported on stderr.
pub(crate) fn teardown(root: &Path) {
    if !root.exists() {
        return;
    }
    let dirs = subtree_post_order(root);
    kill_and_wait(root, &dirs);
    for dir in &dirs {
        for attempt in 0..RMDIR_ATTEMPTS {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) => {
                    if attempt + 1 == RMDIR_ATTEMPTS {
                        eprintln!(
                            "beamlit-testbed: cannot remove cgroup {}: {e}",
                            dir.display()
                        );
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }
}
