//! In-memory storage: each file is a byte vector, and every operation completes the first
//! time it is polled. The production log code runs on it with no glommio executor and no
//! disk, driven by `futures_lite::future::block_on`.
//!
//! What it is for: recovery's fuzz target and its property test (`storage::fuzzing`),
//! which recover one segment per input, millions of times; a real file and an executor per
//! input would be far too slow. What it is not: a model of a disk. Nothing here fails or
//! crashes (`storage::faults` injects those, over real files), and it is never used by
//! the broker. It keeps O_DIRECT's rule that writes are whole aligned blocks (asserted),
//! so a misaligned write in the code under test is a panic here as it is an EINVAL there.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::DmaBuffer;

use super::file::{LogFile, LogStorage};
use super::ALIGNMENT_BYTES;

/// Files by path. Opening a path twice gives two handles on the same bytes.
#[derive(Default)]
pub(crate) struct MemoryStorage {
    files: RefCell<HashMap<PathBuf, MemoryFile>>,
}

impl MemoryStorage {
    /// Creates (or replaces) the file at `path` holding `bytes`.
    pub fn insert(&self, path: &Path, bytes: Vec<u8>) {
        let file = MemoryFile {
            bytes: Rc::new(RefCell::new(bytes)),
        };
        self.files.borrow_mut().insert(path.to_path_buf(), file);
    }

    /// A copy of the file's bytes, `None` when there is no such file.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let files = self.files.borrow();
        files.get(path).map(|file| file.bytes.borrow().clone())
    }
}

/// A handle on one file's bytes.
#[derive(Clone)]
pub(crate) struct MemoryFile {
    bytes: Rc<RefCell<Vec<u8>>>,
}

impl LogFile for MemoryFile {
    type ReadBuffer = Vec<u8>;

    async fn write_at(&self, buffer: Rc<DmaBuffer>, position: u64) -> io::Result<usize> {
        let source = buffer.as_bytes();
        assert!(
            position % ALIGNMENT_BYTES as u64 == 0 && source.len() % ALIGNMENT_BYTES == 0,
            "write of {} bytes at {position}: O_DIRECT takes only whole {ALIGNMENT_BYTES}-byte blocks",
            source.len()
        );
        let start = usize::try_from(position).expect("in-memory files fit in memory");
        let end = start + source.len();
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(source);
        Ok(source.len())
    }

    async fn read_at(&self, position: u64, length: usize) -> io::Result<Vec<u8>> {
        let bytes = self.bytes.borrow();
        let start = usize::try_from(position).map_or(bytes.len(), |start| start.min(bytes.len()));
        let end = start.saturating_add(length).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    async fn fdatasync(&self) -> io::Result<()> {
        Ok(())
    }

    /// `fallocate` without `FALLOC_FL_KEEP_SIZE`: the file grows to `size` (zeros) and
    /// never shrinks.
    async fn pre_allocate(&self, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).expect("in-memory files fit in memory");
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() < size {
            bytes.resize(size, 0);
        }
        Ok(())
    }

    /// `ftruncate`: shrinks, or grows with zeros.
    async fn truncate(&self, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).expect("in-memory files fit in memory");
        self.bytes.borrow_mut().resize(size, 0);
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }

    fn allocate_buffer(&self, size: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer_global(size)
    }
}

impl LogStorage for MemoryStorage {
    type File = MemoryFile;

    async fn open(&self, path: &Path, create: bool) -> io::Result<MemoryFile> {
        let mut files = self.files.borrow_mut();
        if let Some(file) = files.get(path) {
            return Ok(file.clone());
        }
        if !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no in-memory file {}", path.display()),
            ));
        }
        let file = MemoryFile {
            bytes: Rc::new(RefCell::new(Vec::new())),
        };
        files.insert(path.to_path_buf(), file.clone());
        Ok(file)
    }

    /// The same file: every write to memory is as durable as this storage gets (its
    /// fdatasync does nothing).
    async fn open_dsync(&self, path: &Path) -> io::Result<MemoryFile> {
        self.open(path, false).await
    }

    async fn sync_directory(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    // The metadata calls stay in memory too: the trait's defaults run blocking
    // file-system calls on the executor's blocking thread, and there is no executor here.

    /// Directories are implied by the files in them: every directory exists.
    async fn create_directory(&self, _path: &Path) -> io::Result<bool> {
        Ok(false)
    }

    async fn list_directory(&self, path: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        Ok(self
            .files
            .borrow()
            .keys()
            .filter(|file| file.parent() == Some(path))
            .filter_map(|file| file.file_name().map(ToOwned::to_owned))
            .collect())
    }

    async fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.files.borrow().contains_key(path))
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files.borrow_mut();
        let file = files.remove(from).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no in-memory file {}", from.display()),
            )
        })?;
        files.insert(to.to_path_buf(), file);
        Ok(())
    }

    async fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.files.borrow_mut().remove(path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn memory_files_read_write_truncate_and_grow_without_an_executor() {
        let storage = MemoryStorage::default();
        let path = Path::new("segment.log");
        block_on(async {
            assert!(storage.open(path, false).await.is_err());
            let file = storage.open(path, true).await.unwrap();
            let mut buffer = file.allocate_buffer(ALIGNMENT_BYTES);
            buffer.as_bytes_mut().fill(7);
            let written = file
                .write_at(Rc::new(buffer), ALIGNMENT_BYTES as u64)
                .await
                .unwrap();
            assert_eq!(written, ALIGNMENT_BYTES);
            assert_eq!(file.size().await.unwrap(), 2 * ALIGNMENT_BYTES as u64);
            // Reads stop at the end of the file, also when they start past it.
            let read = file
                .read_at(2 * ALIGNMENT_BYTES as u64 - 2, 10)
                .await
                .unwrap();
            assert_eq!(read, vec![7, 7]);
            assert!(file.read_at(u64::MAX, 10).await.unwrap().is_empty());
            file.truncate(ALIGNMENT_BYTES as u64 + 1).await.unwrap();
            file.pre_allocate(ALIGNMENT_BYTES as u64).await.unwrap();
            assert_eq!(file.size().await.unwrap(), ALIGNMENT_BYTES as u64 + 1);
            file.pre_allocate(3 * ALIGNMENT_BYTES as u64).await.unwrap();
            // A second handle sees the same bytes.
            let again = storage.open(path, false).await.unwrap();
            let all = again.read_at(0, usize::MAX).await.unwrap();
            assert_eq!(all.len(), 3 * ALIGNMENT_BYTES);
            assert_eq!(all[ALIGNMENT_BYTES], 7);
            assert!(all[ALIGNMENT_BYTES + 1..].iter().all(|byte| *byte == 0));
        });
        assert_eq!(storage.contents(path).unwrap().len(), 3 * ALIGNMENT_BYTES);
    }

    #[test]
    #[should_panic(expected = "O_DIRECT takes only whole")]
    fn memory_files_refuse_misaligned_writes() {
        let storage = MemoryStorage::default();
        block_on(async {
            let file = storage.open(Path::new("segment.log"), true).await.unwrap();
            let buffer = file.allocate_buffer(ALIGNMENT_BYTES);
            let _ = file.write_at(Rc::new(buffer), 512).await;
        });
    }
}
