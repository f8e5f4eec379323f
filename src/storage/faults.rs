//! Fault-injecting storage for tests: real O_DIRECT files underneath (so alignment and
//! I/O behave as in production), with a plan that injects EIO, ENOSPC, short writes and
//! crashes. A crash loses unsynced writes the way a power cut can: each write since the
//! file's last fdatasync is, at random, kept, lost, or torn at a 4 KiB block boundary.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::Path;
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile};

use super::file::{DmaStorage, LogFile, LogStorage};
use super::ALIGNMENT_BYTES;

/// A small deterministic generator: tests print the seed, and the seed replays the run.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Eio,
    NoSpace,
    /// The write stores only its first half and reports that.
    Short,
}

fn os_error(fault: Fault) -> io::Error {
    match fault {
        Fault::Eio => io::Error::from_raw_os_error(libc::EIO),
        Fault::NoSpace | Fault::Short => io::Error::from_raw_os_error(libc::ENOSPC),
    }
}

struct UnsyncedWrite {
    file: Rc<DmaFile>,
    position: u64,
    previous: Vec<u8>,
}

/// What goes wrong, shared by every file of one storage.
#[derive(Default)]
pub struct FaultPlan {
    /// Every write and preallocation fails with ENOSPC while set.
    pub no_space: Cell<bool>,
    /// The next write fails this way (once).
    pub next_write: Cell<Option<Fault>>,
    /// The next fdatasync fails this way (once).
    pub next_sync: Cell<Option<Fault>>,
    /// The next open of a segment file (`.log`) fails this way (once): a roll creating
    /// its segment, say.
    pub next_segment_open: Cell<Option<Fault>>,
    /// Reads that reached the files: what the tail cache is meant to spare.
    pub reads: Cell<u64>,
    crashed: Cell<bool>,
    unsynced: RefCell<Vec<UnsyncedWrite>>,
}

impl FaultPlan {
    fn check(&self) -> io::Result<()> {
        if self.crashed.get() {
            return Err(io::Error::other("simulated crash: storage is gone"));
        }
        Ok(())
    }

    /// Simulates a power cut: every write since its file's last fdatasync is kept,
    /// lost, or torn at a block boundary; afterwards every operation fails.
    pub async fn crash(&self, rng: &mut TestRng) {
        self.crashed.set(true);
        let writes: Vec<UnsyncedWrite> = self.unsynced.borrow_mut().drain(..).collect();
        for write in writes.into_iter().rev() {
            let blocks = write.previous.len() / ALIGNMENT_BYTES;
            let (from_block, to_block) = match rng.below(4) {
                0 => continue,    // kept whole
                1 => (0, blocks), // lost whole
                _ => {
                    // Torn: a random run of blocks goes back to what was there before.
                    let start = rng.below(blocks as u64 + 1) as usize;
                    let end = start + rng.below((blocks - start) as u64 + 1) as usize;
                    (start, end)
                }
            };
            if from_block == to_block {
                continue;
            }
            let start = from_block * ALIGNMENT_BYTES;
            let end = to_block * ALIGNMENT_BYTES;
            let mut buffer = glommio::allocate_dma_buffer(end - start);
            buffer
                .as_bytes_mut()
                .copy_from_slice(&write.previous[start..end]);
            write
                .file
                .write_rc_at(Rc::new(buffer), write.position + start as u64)
                .await
                .expect("restoring pre-crash bytes");
        }
    }
}

pub struct FaultyStorage {
    pub plan: Rc<FaultPlan>,
}

impl FaultyStorage {
    pub fn new() -> FaultyStorage {
        FaultyStorage {
            plan: Rc::new(FaultPlan::default()),
        }
    }
}

pub struct FaultyFile {
    inner: Rc<DmaFile>,
    plan: Rc<FaultPlan>,
}

impl LogFile for FaultyFile {
    type ReadBuffer = glommio::io::ReadResult;

    async fn write_at(&self, buffer: Rc<DmaBuffer>, position: u64) -> io::Result<usize> {
        self.plan.check()?;
        if self.plan.no_space.get() {
            return Err(os_error(Fault::NoSpace));
        }
        let fault = self.plan.next_write.take();
        if let Some(fault @ (Fault::Eio | Fault::NoSpace)) = fault {
            return Err(os_error(fault));
        }
        let previous = self.inner.read_at(position, buffer.len()).await?;
        let mut previous = previous.to_vec();
        previous.resize(buffer.len(), 0);
        self.plan.unsynced.borrow_mut().push(UnsyncedWrite {
            file: Rc::clone(&self.inner),
            position,
            previous,
        });
        if fault == Some(Fault::Short) {
            let half = (buffer.len() / 2 / ALIGNMENT_BYTES * ALIGNMENT_BYTES).max(ALIGNMENT_BYTES);
            let half = half.min(buffer.len());
            let mut partial = glommio::allocate_dma_buffer(half);
            partial
                .as_bytes_mut()
                .copy_from_slice(&buffer.as_bytes()[..half]);
            let written = self.inner.write_rc_at(Rc::new(partial), position).await?;
            return Ok(written.min(buffer.len() - 1));
        }
        Ok(self.inner.write_rc_at(buffer, position).await?)
    }

    async fn read_at(&self, position: u64, length: usize) -> io::Result<Self::ReadBuffer> {
        self.plan.check()?;
        self.plan.reads.set(self.plan.reads.get() + 1);
        Ok(self.inner.read_at(position, length).await?)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        self.plan.check()?;
        if let Some(fault) = self.plan.next_sync.take() {
            return Err(os_error(fault));
        }
        self.inner.fdatasync().await?;
        self.plan
            .unsynced
            .borrow_mut()
            .retain(|write| !Rc::ptr_eq(&write.file, &self.inner));
        Ok(())
    }

    async fn pre_allocate(&self, size: u64) -> io::Result<()> {
        self.plan.check()?;
        if self.plan.no_space.get() {
            return Err(os_error(Fault::NoSpace));
        }
        LogFile::pre_allocate(&*self.inner, size).await
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        self.plan.check()?;
        LogFile::truncate(&*self.inner, size).await
    }

    async fn size(&self) -> io::Result<u64> {
        self.plan.check()?;
        LogFile::size(&*self.inner).await
    }
}

impl LogStorage for FaultyStorage {
    type File = FaultyFile;

    async fn open(&self, path: &Path, create: bool) -> io::Result<FaultyFile> {
        self.plan.check()?;
        if path.extension().is_some_and(|extension| extension == "log") {
            if let Some(fault) = self.plan.next_segment_open.take() {
                return Err(os_error(fault));
            }
        }
        let inner = DmaStorage.open(path, create).await?;
        Ok(FaultyFile {
            inner: Rc::new(inner),
            plan: Rc::clone(&self.plan),
        })
    }

    async fn sync_directory(&self, path: &Path) -> io::Result<()> {
        self.plan.check()?;
        DmaStorage.sync_directory(path).await
    }
}
