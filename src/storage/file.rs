//! The file seam of the log: what the partition log needs from a file system, and the
//! production implementation over glommio's `DmaFile` (O_DIRECT, io_uring).
//!
//! Tests implement the same traits to inject torn and short writes, EIO, ENOSPC and
//! crashes that drop unsynced writes (`storage::faults`), and run the production log code
//! unchanged on top; recovery's fuzz target runs it on files held in memory
//! (`storage::memory`).

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

/// Opening files and making directory entries durable.
#[allow(async_fn_in_trait)]
pub trait LogStorage: 'static {
    type File: LogFile;
    async fn open(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    async fn sync_directory(&self, path: &Path) -> io::Result<()>;
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

    async fn sync_directory(&self, path: &Path) -> io::Result<()> {
        let directory = Directory::open(path).await?;
        directory.sync().await?;
        let _ = directory.close().await;
        Ok(())
    }
}
