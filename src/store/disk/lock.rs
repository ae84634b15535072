//! One process per data directory (docs/behaviour.md §11): an exclusive lock on `LOCK` in the
//! directory, held while the store is open. The kernel drops it when the process dies, SIGKILL
//! included, so a crashed proxy never leaves a stale lock behind.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// The name of the lock file in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// The held lock; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why the directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data directory {0} is in use by another idemproxy process (it holds {0}/{LOCK_FILE}); one process per directory")]
    Busy(PathBuf),
    #[error("cannot lock data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DirLock {
    /// Locks `dir` (which exists) for this process, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Busy(dir.to_owned())),
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DirLock::acquire(dir.path()).expect("first lock");
        let err = DirLock::acquire(dir.path()).expect_err("second lock");
        assert!(matches!(err, LockError::Busy(_)));
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        drop(first);
        DirLock::acquire(dir.path()).expect("free again");
    }
}
