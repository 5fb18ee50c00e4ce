use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::naming::{CGROUP_PREFIX, unique_name};

/// A private directory under the system temp dir for a test's files (stop files
/// for `until_file` probes, routes files, logs); removed with its contents on
/// drop, and swept by [`crate::cleanup_stale`] if the test process died.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/beamlit-test-<hint>-<pid>-<n>`.
    pub fn new(hint: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name(CGROUP_PREFIX, hint));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "beamlit-testbed: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}
