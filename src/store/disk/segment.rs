//! The segment files of the data directory (docs/behaviour.md §11.1): `00000001.seg`,
//! `00000002.seg`, …, appended to in order, the highest one being the one written. Each is
//! opened once and read with `pread` by any thread; the writer alone appends, and drops whole
//! segments once nothing in them is needed.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A segment's file name ends with this.
pub const SUFFIX: &str = ".seg";

/// The path of segment `id` in `dir`.
pub fn path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}{SUFFIX}"))
}

/// The segments in `dir`, by number (other files are left alone).
pub fn list(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
            continue;
        };
        if stem.len() == 8 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(id) = stem.parse() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Opens segment `id` for reading and appending, creating it if `create`.
pub fn open(dir: &Path, id: u32, create: bool) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path(dir, id))
}

/// Makes the directory's entries (a new or removed segment) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What the writer knows of one segment: enough to tell when it can be dropped or is worth
/// compacting.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// The file's length.
    pub size: u64,
    /// Index entries pointing into it, and their frames' bytes.
    pub live: u64,
    pub live_bytes: u64,
    /// The latest expiry of any frame in it: once passed, nothing in it matters.
    pub max_expiry: u64,
    /// The latest expiry of a deletion in it: until then, a deletion may still hide an older
    /// segment's record.
    pub max_deleted_expiry: u64,
    /// Compaction left something in it that it could not copy: not compacted again.
    pub pinned: bool,
}

impl Stats {
    /// Whether nothing in it is needed any more at `now_ms`.
    pub fn droppable(&self, now_ms: u64) -> bool {
        self.max_expiry <= now_ms || (self.live == 0 && self.max_deleted_expiry <= now_ms)
    }

    /// Whether less than half of it is live (copying the rest forward halves its space).
    pub fn sparse(&self) -> bool {
        self.live_bytes.saturating_mul(2) < self.size
    }

    pub fn add(&mut self, len: u32) {
        self.live += 1;
        self.live_bytes += u64::from(len);
    }

    pub fn remove(&mut self, len: u32) {
        self.live = self.live.saturating_sub(1);
        self.live_bytes = self.live_bytes.saturating_sub(u64::from(len));
    }

    pub fn wrote(&mut self, len: usize, expires_at_ms: u64, deletion: bool) {
        self.size += len as u64;
        self.max_expiry = self.max_expiry.max(expires_at_ms);
        if deletion {
            self.max_deleted_expiry = self.max_deleted_expiry.max(expires_at_ms);
        }
    }
}

/// The open segment files, shared by readers and the writer.
#[derive(Default)]
pub struct Files {
    files: RwLock<HashMap<u32, Arc<File>>>,
}

/// Why a frame could not be read.
pub enum ReadError {
    /// Its segment was dropped (compacted) since the index was read: read the index again.
    Gone,
    Io(io::Error),
}

impl Files {
    pub fn insert(&self, id: u32, file: Arc<File>) {
        self.write().insert(id, file);
    }

    pub fn get(&self, id: u32) -> Option<Arc<File>> {
        self.files
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn remove(&self, id: u32) {
        self.write().remove(&id);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Arc<File>>> {
        self.files.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `len` bytes at `offset` of segment `id`.
    pub fn read(&self, id: u32, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        let file = self.get(id).ok_or(ReadError::Gone)?;
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, offset).map_err(ReadError::Io)?;
        Ok(bytes)
    }
}
