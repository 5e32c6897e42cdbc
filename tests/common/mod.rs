//! What several test binaries share.

use std::path::{Path, PathBuf};

/// A test's own directory, removed when the test passes and kept, for a
/// look, when it fails.
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// `peregrine-{prefix}-{pid}-{name}` in the system's temporary directory.
    pub fn new(prefix: &str, name: &str) -> WorkDir {
        let dir =
            std::env::temp_dir().join(format!("peregrine-{prefix}-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        WorkDir(dir)
    }
}

impl std::ops::Deref for WorkDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
