//! The file seam of the log: what the partition log needs from a file system, and the
//! production implementation over glommio's `DmaFile` (O_DIRECT, io_uring).
//!
//! Tests implement the same traits to inject torn and short writes, EIO, ENOSPC and
//! crashes that drop unsynced writes and undo directory changes not yet fsynced
//! (`storage::faults`, which therefore implements every metadata call too), and run the
//! production log code unchanged on top; recovery's fuzz target runs it on files held in memory
//! (`storage::memory`).
//!
//! File-system metadata calls that io_uring does not do for glommio (creating and
//! listing directories, renaming and removing files, looking whether a file exists) are
//! blocking system calls: each runs on the executor's blocking thread
//! (`run_blocking`), never on the shard's reactor, where a slow directory operation
//! would stall every connection and partition of the shard meanwhile (a topic created at
//! run time opens its partitions while the shard serves others). Opening, reading,
//! writing, preallocating and syncing files and directories go through io_uring and stay
//! where they are.

use std::ffi::OsString;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::rc::Rc;

use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions, ReadResult};

/// One segment file. Positions and lengths of writes are multiples of the alignment.
// The futures are !Send by design: a shard's I/O never leaves its thread, so the auto-trait
// bounds `async fn` in a public trait cannot express are not wanted here.
#[allow(async_fn_in_trait)]
pub trait LogFile: 'static {
    type ReadBuffer: Deref<Target = [u8]>;
    /// Writes the whole buffer at `position`; returns the bytes written (a short count is
    /// the caller's to treat as an error).
    async fn write_at(&self, buffer: Rc<DmaBuffer>, position: u64) -> io::Result<usize>;
    /// Reads up to `length` bytes at `position`; fewer at the end of the file.
    async fn read_at(&self, position: u64, length: usize) -> io::Result<Self::ReadBuffer>;
    async fn fdatasync(&self) -> io::Result<()>;
    /// Reserves `size` bytes and sets the file size to it.
    async fn pre_allocate(&self, size: u64) -> io::Result<()>;
    async fn truncate(&self, size: u64) -> io::Result<()>;
    async fn size(&self) -> io::Result<u64>;
    /// An aligned buffer of `size` bytes for `write_at`. By default from the running
    /// glommio executor's pool (memory registered with io_uring), which panics outside an
    /// executor; the in-memory file (`storage::memory`) takes heap memory instead, so
    /// recovery can run on it with no executor at all.
    fn allocate_buffer(&self, size: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer(size)
    }
}

/// Opening files, making directory entries durable, and the metadata calls around them
/// (by default on the blocking thread: `run_blocking`).
#[allow(async_fn_in_trait)]
pub trait LogStorage: 'static {
    type File: LogFile;
    async fn open(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    /// Opens an existing file a second time for durable writes: each `write_at` through
    /// the returned handle returns once its bytes (and the metadata needed to read them
    /// back, such as an extent conversion or a size change) are durable, as a write
    /// followed by an fdatasync of the file would be (O_DSYNC), in one operation instead
    /// of two. It covers only that write: writes through other handles still need an
    /// fdatasync.
    async fn open_dsync(&self, path: &Path) -> io::Result<Self::File>;
    async fn sync_directory(&self, path: &Path) -> io::Result<()>;

    /// Creates `path` and any missing parents (not synced: the caller syncs the parent).
    /// True when `path` did not exist before.
    async fn create_directory(&self, path: &Path) -> io::Result<bool> {
        let path = path.to_path_buf();
        run_blocking(move || {
            #[cfg(debug_assertions)]
            crate::test_hooks::PARTITION_DIRECTORY_GATE.pass();
            if path.try_exists()? {
                return Ok(false);
            }
            std::fs::create_dir_all(&path)?;
            Ok(true)
        })
        .await
    }

    /// The names of the entries of directory `path`.
    async fn list_directory(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let path = path.to_path_buf();
        run_blocking(move || {
            std::fs::read_dir(&path)?
                .map(|entry| entry.map(|entry| entry.file_name()))
                .collect()
        })
        .await
    }

    async fn exists(&self, path: &Path) -> io::Result<bool> {
        let path = path.to_path_buf();
        run_blocking(move || path.try_exists()).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        run_blocking(move || std::fs::rename(from, to)).await
    }

    /// Removes the file at `path`; one that is not there counts as removed.
    async fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = path.to_path_buf();
        run_blocking(move || match std::fs::remove_file(path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .await
    }
}

/// Runs a blocking file-system call on the executor's blocking thread (glommio's
/// `spawn_blocking`; the broker pins it to the shard's CPU), so the reactor keeps serving
/// while it runs.
pub async fn run_blocking<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(work).await
}

/// Production storage: O_DIRECT files through io_uring.
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaStorage;

impl LogFile for DmaFile {
    type ReadBuffer = ReadResult;

    async fn write_at(&self, buffer: Rc<DmaBuffer>, position: u64) -> io::Result<usize> {
        Ok(self.write_rc_at(buffer, position).await?)
    }

    async fn read_at(&self, position: u64, length: usize) -> io::Result<ReadResult> {
        Ok(DmaFile::read_at(self, position, length).await?)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        Ok(DmaFile::fdatasync(self).await?)
    }

    async fn pre_allocate(&self, size: u64) -> io::Result<()> {
        Ok(DmaFile::pre_allocate(self, size, false).await?)
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        Ok(DmaFile::truncate(self, size).await?)
    }

    async fn size(&self) -> io::Result<u64> {
        Ok(self.file_size().await?)
    }
}

impl LogStorage for DmaStorage {
    type File = DmaFile;

    async fn open(&self, path: &Path, create: bool) -> io::Result<DmaFile> {
        Ok(OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .dma_open(path)
            .await?)
    }

    async fn open_dsync(&self, path: &Path) -> io::Result<DmaFile> {
        Ok(OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .dma_open(path)
            .await?)
    }

    async fn sync_directory(&self, path: &Path) -> io::Result<()> {
        let directory = Directory::open(path).await?;
        directory.sync().await?;
        let _ = directory.close().await;
        Ok(())
    }
}
