//! Fault-injecting storage for tests: real O_DIRECT files underneath (so alignment and
//! I/O behave as in production), with a plan that injects EIO, ENOSPC, short writes and
//! crashes. Test-only (`#[cfg(test)]`), on the test's one glommio executor.
//!
//! The crash model (docs/reliability.md, "The storage crash model"):
//! - every call through the seam (`LogStorage` and `LogFile`: opens, reads, writes,
//!   fdatasyncs, preallocations, truncations, sizes, renames, removals, directory
//!   creation, listing and fsync) is one numbered operation. A plan can crash at its k-th
//!   operation (`crash_at_operation`, or k operations after the next call of a kind on
//!   a kind of file, `crash_trigger`): that call and every later one fail, calls
//!   already in flight finish on the disk but report failure, so the caller never learns
//!   they completed. The log under test sees I/O errors, as a process would see nothing
//!   more after a power cut; the test then resolves the crash (`crash`) and recovers;
//! - a write not yet covered by a completed fdatasync of its file is, at the crash, kept,
//!   lost, or torn: each 4 KiB block independently keeps the new bytes, keeps the old
//!   ones, or holds a prefix of the new bytes over the old ones (a block written part
//!   way). An fdatasync covers only the writes that had completed when it started. A
//!   write through a handle opened for durable writes (`open_dsync`, O_DSYNC) is covered
//!   once it returns success, and by nothing else: one still in flight at the crash is
//!   kept, lost or torn like any other. Its blocks keep its bytes whatever becomes of
//!   older unsynced writes to them (a zero-fill ahead of the data, say): the disk holds
//!   the newest durable content of a block;
//! - a directory entry change (a file created, renamed, removed; a directory created)
//!   not yet followed by a completed fsync of its directory may be undone at the crash.
//!   Changes are undone as a suffix of the order they were made in: a journaling file
//!   system (ext4, xfs) commits metadata in order, so a later change never survives an
//!   earlier one it followed. What this does not model: a file system that reorders
//!   directory changes (losing an earlier one and keeping a later one), and the loss of
//!   a size change (`truncate`, `pre_allocate`) before the file's next fdatasync, which
//!   the model keeps as done once it returns.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
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

/// The (device, inode) of an open file, from its descriptor: two handles of one file
/// share it.
fn identity(file: &DmaFile) -> (u64, u64) {
    (
        (u64::from(file.dev_major()) << 32) | u64::from(file.dev_minor()),
        file.inode(),
    )
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated crash: storage is gone")
}

struct UnsyncedWrite {
    /// In the order the writes started.
    id: u64,
    file: Rc<DmaFile>,
    /// (device, inode): the file whatever handle wrote it.
    identity: (u64, u64),
    /// A segment file (`.log`): what "a torn data write" counts.
    segment: bool,
    /// Every byte written was zero: on a segment, a zero-fill write ahead of the data
    /// (storage::zero_fill), resolved at a crash like any other write.
    zeros: bool,
    position: u64,
    previous: Vec<u8>,
    /// The write reached the file: an fdatasync that starts after this covers it.
    completed: bool,
}

/// A directory entry change not yet covered by an fsync of its directory.
#[derive(Debug)]
enum MetadataChange {
    Created {
        path: PathBuf,
    },
    CreatedDirectory {
        path: PathBuf,
    },
    Renamed {
        from: PathBuf,
        to: PathBuf,
        /// A hard link to the file `to` named before the rename replaced it.
        displaced: Option<PathBuf>,
    },
    Removed {
        path: PathBuf,
        /// A hard link to the removed file, to bring it back.
        backup: PathBuf,
    },
}

impl MetadataChange {
    /// The directory whose fsync makes the change durable.
    fn directory(&self) -> &Path {
        let path = match self {
            MetadataChange::Created { path }
            | MetadataChange::CreatedDirectory { path }
            | MetadataChange::Removed { path, .. } => path,
            MetadataChange::Renamed { to, .. } => to,
        };
        path.parent()
            .expect("the files of a partition live in a directory")
    }

    /// Puts the directory entries back as they were before the change.
    fn undo(&self) {
        let undone = match self {
            MetadataChange::Created { path } => std::fs::remove_file(path),
            MetadataChange::CreatedDirectory { path } => std::fs::remove_dir_all(path),
            MetadataChange::Renamed {
                from,
                to,
                displaced,
            } => std::fs::rename(to, from).and_then(|()| match displaced {
                Some(backup) => std::fs::rename(backup, to),
                None => Ok(()),
            }),
            MetadataChange::Removed { path, backup } => std::fs::rename(backup, path),
        };
        // Changes are undone newest first, so the state each one left is there to undo.
        undone.unwrap_or_else(|error| panic!("undoing {self:?} at a simulated crash: {error}"));
    }
}

/// Where `FaultPlan::crash_trigger` aims a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashTrigger {
    /// The kind of operation that arms it ("write", "fdatasync", …); empty: any.
    pub operation: &'static str,
    /// The end of a path the operation touches (`spare.log`, `.log`).
    pub path_suffix: String,
    /// The storage crashes at this operation counted from the matching one (1: that one).
    pub after: u64,
}

/// What one crash did to the state it found: the counts a test sums and prints.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CrashReport {
    /// Operations still running when the storage crashed (they finished on the disk, and
    /// their callers were told they failed).
    pub operations_in_flight: u64,
    /// Unsynced writes kept whole.
    pub writes_kept: u64,
    /// Unsynced writes lost whole.
    pub writes_dropped: u64,
    /// Unsynced writes torn: some of their blocks kept, some lost or written part way.
    pub writes_torn: u64,
    /// Of `writes_torn`, writes to segment files (`.log`): torn record data.
    pub segment_writes_torn: u64,
    /// Blocks left holding a prefix of the new bytes over the old ones.
    pub blocks_written_part_way: u64,
    /// Unsynced writes of only zeros to segment files (zero-fill writes) resolved at the
    /// crash, whichever way.
    pub segment_zero_writes_unsynced: u64,
    /// Unsynced directory changes that survived.
    pub metadata_kept: u64,
    /// Unsynced directory changes undone.
    pub metadata_undone: u64,
    /// Writes through O_DSYNC handles that returned before the crash, over the storage's
    /// life: durable, so not resolved by it.
    pub dsync_writes: u64,
    /// Times such a write covered blocks of an older unsynced write (a zero-fill), which
    /// the crash then could not take back.
    pub dsync_over_unsynced: u64,
}

impl CrashReport {
    pub fn add(&mut self, other: &CrashReport) {
        self.operations_in_flight += other.operations_in_flight;
        self.writes_kept += other.writes_kept;
        self.writes_dropped += other.writes_dropped;
        self.writes_torn += other.writes_torn;
        self.segment_writes_torn += other.segment_writes_torn;
        self.dsync_writes += other.dsync_writes;
        self.dsync_over_unsynced += other.dsync_over_unsynced;
        self.blocks_written_part_way += other.blocks_written_part_way;
        self.segment_zero_writes_unsynced += other.segment_zero_writes_unsynced;
        self.metadata_kept += other.metadata_kept;
        self.metadata_undone += other.metadata_undone;
    }
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
    /// The next open of a segment file (`.log`): a roll creating its segment, say.
    pub next_segment_open: Cell<Option<Fault>>,
    /// The next `open_dsync` fails this way (once).
    pub next_dsync_open: Cell<Option<Fault>>,
    /// Reads that reached the files: what the tail cache is meant to spare.
    pub reads: Cell<u64>,
    /// Writes through handles opened for durable writes that returned success.
    pub dsync_writes: Cell<u64>,
    /// Times one of those covered blocks of an older unsynced write (a zero-fill): blocks
    /// a crash can no longer take back.
    pub dsync_over_unsynced: Cell<u64>,
    /// Completed fdatasyncs, of any file.
    pub fdatasyncs: Cell<u64>,
    /// The storage crashes at this operation (counted from 1 over the plan's life).
    pub crash_at_operation: Cell<Option<u64>>,
    /// The storage crashes some operations after the next one that matches this trigger:
    /// aims a crash at a roll or retention pass (any operation on `spare.log`), or at a
    /// round's segment fdatasync with its writes done.
    pub crash_trigger: RefCell<Option<CrashTrigger>>,
    operations: Cell<u64>,
    in_flight: Cell<u64>,
    crashed: Cell<bool>,
    /// What the operation that crashed was doing.
    crash_operation: RefCell<Option<String>>,
    next_write_id: Cell<u64>,
    unsynced: RefCell<Vec<UnsyncedWrite>>,
    metadata: RefCell<Vec<MetadataChange>>,
}

/// One operation through the seam, counted in flight until dropped.
struct Operation<'a> {
    plan: &'a FaultPlan,
}

impl Operation<'_> {
    /// After the disk did its part: an operation in flight when the storage crashed
    /// reports failure, so nothing it did is acknowledged.
    fn finish(&self) -> io::Result<()> {
        if self.plan.crashed.get() {
            return Err(crashed_error());
        }
        Ok(())
    }
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        self.plan.in_flight.set(self.plan.in_flight.get() - 1);
    }
}

impl FaultPlan {
    /// Starts operation `what` on `path`, or fails it: the storage has crashed, or
    /// crashes now.
    fn begin(&self, what: &str, path: &Path) -> io::Result<Operation<'_>> {
        self.begin_on(what, &[path])
    }

    /// `begin` for an operation on several paths (a rename): each counts as touched.
    fn begin_on(&self, what: &str, paths: &[&Path]) -> io::Result<Operation<'_>> {
        if self.crashed.get() {
            return Err(crashed_error());
        }
        let number = self.operations.get() + 1;
        self.operations.set(number);
        let triggered = {
            let trigger = self.crash_trigger.borrow();
            trigger.as_ref().and_then(|trigger| {
                let touches = paths.iter().any(|path| {
                    path.to_str()
                        .is_some_and(|path| path.ends_with(trigger.path_suffix.as_str()))
                });
                let kind = trigger.operation.is_empty() || trigger.operation == what;
                (touches && kind).then_some(trigger.after)
            })
        };
        if let Some(after) = triggered {
            self.crash_trigger.replace(None);
            self.crash_at_operation.set(Some(number + after.max(1) - 1));
        }
        if self.crash_at_operation.get() == Some(number) {
            self.crashed.set(true);
            let paths: Vec<String> = paths
                .iter()
                .map(|path| path.display().to_string())
                .collect();
            self.crash_operation
                .replace(Some(format!("{what} {}", paths.join(" -> "))));
            return Err(crashed_error());
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(Operation { plan: self })
    }

    /// Operations started so far.
    pub fn operations(&self) -> u64 {
        self.operations.get()
    }

    /// Whether the storage has crashed (by `crash` or at a planned operation).
    pub fn crashed(&self) -> bool {
        self.crashed.get()
    }

    /// The operation a planned crash stopped at ("rename /…/spare.log"), if any.
    pub fn crash_operation(&self) -> Option<String> {
        self.crash_operation.borrow().clone()
    }

    fn backup_path(&self, of: &Path) -> PathBuf {
        // Beside the partition directory, so that recovery never lists it, and on the
        // same file system, so that a hard link keeps the file.
        let directory = of.parent().and_then(Path::parent).unwrap_or(Path::new("."));
        let backups = directory.join(".fault-backups");
        std::fs::create_dir_all(&backups).expect("creating the crash backups directory");
        // Unique across plans: every storage of a test shares the directory.
        static BACKUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let number = BACKUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        backups.join(number.to_string())
    }

    /// Simulates a power cut, or resolves the one a planned operation caused: waits for
    /// operations in flight to finish, then every write since its file's last fdatasync
    /// is kept, lost or torn, and every directory change since its directory's last fsync
    /// may be undone (a suffix of them is). Afterwards every operation fails.
    pub async fn crash(&self, rng: &mut TestRng) -> CrashReport {
        self.crashed.set(true);
        let mut report = CrashReport {
            operations_in_flight: self.in_flight.get(),
            ..CrashReport::default()
        };
        // Operations that started before the crash complete on the disk (their callers
        // are told they failed); only then is what they left resolved.
        let mut waited = 0;
        while self.in_flight.get() > 0 {
            waited += 1;
            assert!(
                waited < 60_000,
                "{} storage operations never finished after a simulated crash",
                self.in_flight.get()
            );
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let writes: Vec<UnsyncedWrite> = self.unsynced.borrow_mut().drain(..).collect();
        // Newest first: each write finds in its range what it wrote, or what a later
        // write's outcome left there.
        for write in writes.into_iter().rev() {
            if write.segment && write.zeros {
                report.segment_zero_writes_unsynced += 1;
            }
            let blocks = write.previous.len() / ALIGNMENT_BYTES;
            let current = write
                .file
                .read_at(write.position, write.previous.len())
                .await
                .expect("reading what an unsynced write left");
            let mut result = current.to_vec();
            result.resize(write.previous.len(), 0);
            let whole = rng.below(4);
            let (mut new_blocks, mut old_blocks, mut partial_blocks) = (0u64, 0u64, 0u64);
            for block in 0..blocks {
                let range = block * ALIGNMENT_BYTES..(block + 1) * ALIGNMENT_BYTES;
                let outcome = match whole {
                    0 => 0,
                    1 => 1,
                    _ => rng.below(3),
                };
                match outcome {
                    0 => new_blocks += 1,
                    1 => {
                        result[range.clone()].copy_from_slice(&write.previous[range]);
                        old_blocks += 1;
                    }
                    _ => {
                        // A block written part way: the new bytes up to a point, the old
                        // ones after it.
                        let cut = 1 + rng.below(ALIGNMENT_BYTES as u64 - 1) as usize;
                        let from = range.start + cut;
                        result[from..range.end].copy_from_slice(&write.previous[from..range.end]);
                        partial_blocks += 1;
                    }
                }
            }
            report.blocks_written_part_way += partial_blocks;
            if old_blocks == 0 && partial_blocks == 0 {
                report.writes_kept += 1;
                continue;
            }
            if new_blocks == 0 && partial_blocks == 0 {
                report.writes_dropped += 1;
            } else {
                report.writes_torn += 1;
                if write.segment {
                    report.segment_writes_torn += 1;
                }
            }
            let mut buffer = glommio::allocate_dma_buffer(result.len());
            buffer.as_bytes_mut().copy_from_slice(&result);
            write
                .file
                .write_rc_at(Rc::new(buffer), write.position)
                .await
                .expect("restoring pre-crash bytes");
        }
        let changes: Vec<MetadataChange> = self.metadata.borrow_mut().drain(..).collect();
        let kept = rng.below(changes.len() as u64 + 1) as usize;
        report.metadata_kept = kept as u64;
        report.metadata_undone = (changes.len() - kept) as u64;
        report.dsync_writes = self.dsync_writes.get();
        report.dsync_over_unsynced = self.dsync_over_unsynced.get();
        for change in changes[kept..].iter().rev() {
            change.undo();
        }
        report
    }

    fn record(&self, change: MetadataChange) {
        self.metadata.borrow_mut().push(change);
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
    /// (device, inode), taken at open.
    identity: (u64, u64),
    path: PathBuf,
    plan: Rc<FaultPlan>,
    /// Opened by `open_dsync`: each write is durable when it returns.
    dsync: bool,
}

impl FaultyFile {
    fn is_segment(&self) -> bool {
        self.path
            .extension()
            .is_some_and(|extension| extension == "log")
    }
}

impl LogFile for FaultyFile {
    type ReadBuffer = glommio::io::ReadResult;

    async fn write_at(&self, buffer: Rc<DmaBuffer>, position: u64) -> io::Result<usize> {
        let operation = self.plan.begin("write", &self.path)?;
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
        let id = self.plan.next_write_id.get();
        self.plan.next_write_id.set(id + 1);
        self.plan.unsynced.borrow_mut().push(UnsyncedWrite {
            id,
            file: Rc::clone(&self.inner),
            identity: self.identity,
            segment: self.is_segment(),
            zeros: buffer.as_bytes().iter().all(|byte| *byte == 0),
            position,
            previous,
            completed: false,
        });
        let durable_bytes = self.dsync.then(|| Rc::clone(&buffer));
        let written = if fault == Some(Fault::Short) {
            let half = (buffer.len() / 2 / ALIGNMENT_BYTES * ALIGNMENT_BYTES).max(ALIGNMENT_BYTES);
            let half = half.min(buffer.len());
            let mut partial = glommio::allocate_dma_buffer(half);
            partial
                .as_bytes_mut()
                .copy_from_slice(&buffer.as_bytes()[..half]);
            let written = self.inner.write_rc_at(Rc::new(partial), position).await;
            written.map(|written| written.min(buffer.len() - 1))
        } else {
            self.inner.write_rc_at(buffer, position).await
        };
        if let Some(write) = self
            .plan
            .unsynced
            .borrow_mut()
            .iter_mut()
            .find(|write| write.id == id)
        {
            write.completed = true;
        }
        let written = written?;
        operation.finish()?;
        if let Some(bytes) = durable_bytes {
            // Returned before any crash: O_DSYNC made it durable. Older unsynced writes to
            // the same blocks can no longer take them back: what they would restore there
            // is now these bytes.
            let bytes = &bytes.as_bytes()[..written.min(bytes.len())];
            let end = position + bytes.len() as u64;
            let mut unsynced = self.plan.unsynced.borrow_mut();
            for older in unsynced
                .iter_mut()
                .filter(|older| older.id < id && older.identity == self.identity)
            {
                let from = older.position.max(position);
                let to = (older.position + older.previous.len() as u64).min(end);
                if from < to {
                    // Two writes of one block in flight together have no defined result
                    // on a disk; the log never issues them (rounds do not overlap, and
                    // zero-fill never runs beside a round).
                    assert!(
                        older.completed,
                        "an O_DSYNC write overlapped a write still in flight to the same blocks"
                    );
                    self.plan
                        .dsync_over_unsynced
                        .set(self.plan.dsync_over_unsynced.get() + 1);
                    older.previous
                        [(from - older.position) as usize..(to - older.position) as usize]
                        .copy_from_slice(
                            &bytes[(from - position) as usize..(to - position) as usize],
                        );
                }
            }
            unsynced.retain(|write| write.id != id);
            self.plan.dsync_writes.set(self.plan.dsync_writes.get() + 1);
        }
        Ok(written)
    }

    async fn read_at(&self, position: u64, length: usize) -> io::Result<Self::ReadBuffer> {
        let operation = self.plan.begin("read", &self.path)?;
        self.plan.reads.set(self.plan.reads.get() + 1);
        let read = self.inner.read_at(position, length).await?;
        operation.finish()?;
        Ok(read)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        let operation = self.plan.begin("fdatasync", &self.path)?;
        if let Some(fault) = self.plan.next_sync.take() {
            return Err(os_error(fault));
        }
        // Only writes that reached the file before the sync started are covered by it.
        let covered: Vec<u64> = self
            .plan
            .unsynced
            .borrow()
            .iter()
            .filter(|write| write.completed && write.identity == self.identity)
            .map(|write| write.id)
            .collect();
        self.inner.fdatasync().await?;
        operation.finish()?;
        self.plan.fdatasyncs.set(self.plan.fdatasyncs.get() + 1);
        self.plan
            .unsynced
            .borrow_mut()
            .retain(|write| !covered.contains(&write.id));
        Ok(())
    }

    async fn pre_allocate(&self, size: u64) -> io::Result<()> {
        let operation = self.plan.begin("pre_allocate", &self.path)?;
        if self.plan.no_space.get() {
            return Err(os_error(Fault::NoSpace));
        }
        LogFile::pre_allocate(&*self.inner, size).await?;
        operation.finish()
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        let operation = self.plan.begin("truncate", &self.path)?;
        LogFile::truncate(&*self.inner, size).await?;
        operation.finish()
    }

    async fn size(&self) -> io::Result<u64> {
        let operation = self.plan.begin("size", &self.path)?;
        let size = LogFile::size(&*self.inner).await?;
        operation.finish()?;
        Ok(size)
    }
}

impl LogStorage for FaultyStorage {
    type File = FaultyFile;

    async fn open(&self, path: &Path, create: bool) -> io::Result<FaultyFile> {
        let operation = self.plan.begin("open", path)?;
        if path.extension().is_some_and(|extension| extension == "log") {
            if let Some(fault) = self.plan.next_segment_open.take() {
                return Err(os_error(fault));
            }
        }
        let created = create && !path.try_exists()?;
        let inner = DmaStorage.open(path, create).await?;
        if created {
            self.plan.record(MetadataChange::Created {
                path: path.to_path_buf(),
            });
        }
        operation.finish()?;
        Ok(FaultyFile {
            identity: identity(&inner),
            inner: Rc::new(inner),
            path: path.to_path_buf(),
            plan: Rc::clone(&self.plan),
            dsync: false,
        })
    }

    async fn open_dsync(&self, path: &Path) -> io::Result<FaultyFile> {
        let operation = self.plan.begin("open_dsync", path)?;
        if let Some(fault) = self.plan.next_dsync_open.take() {
            return Err(os_error(fault));
        }
        let inner = DmaStorage.open_dsync(path).await?;
        operation.finish()?;
        Ok(FaultyFile {
            identity: identity(&inner),
            inner: Rc::new(inner),
            path: path.to_path_buf(),
            plan: Rc::clone(&self.plan),
            dsync: true,
        })
    }

    async fn sync_directory(&self, path: &Path) -> io::Result<()> {
        let operation = self.plan.begin("sync_directory", path)?;
        DmaStorage.sync_directory(path).await?;
        operation.finish()?;
        self.plan
            .metadata
            .borrow_mut()
            .retain(|change| change.directory() != path);
        Ok(())
    }

    async fn create_directory(&self, path: &Path) -> io::Result<bool> {
        let operation = self.plan.begin("create_directory", path)?;
        let created = DmaStorage.create_directory(path).await?;
        if created {
            self.plan.record(MetadataChange::CreatedDirectory {
                path: path.to_path_buf(),
            });
        }
        operation.finish()?;
        Ok(created)
    }

    async fn list_directory(&self, path: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let operation = self.plan.begin("list_directory", path)?;
        let names = DmaStorage.list_directory(path).await?;
        operation.finish()?;
        Ok(names)
    }

    async fn exists(&self, path: &Path) -> io::Result<bool> {
        let operation = self.plan.begin("exists", path)?;
        let exists = DmaStorage.exists(path).await?;
        operation.finish()?;
        Ok(exists)
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let operation = self.plan.begin_on("rename", &[from, to])?;
        let displaced = if to.try_exists()? {
            let backup = self.plan.backup_path(to);
            std::fs::hard_link(to, &backup)?;
            Some(backup)
        } else {
            None
        };
        DmaStorage.rename(from, to).await?;
        self.plan.record(MetadataChange::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            displaced,
        });
        operation.finish()
    }

    async fn remove_file(&self, path: &Path) -> io::Result<()> {
        let operation = self.plan.begin("remove_file", path)?;
        if path.try_exists()? {
            let backup = self.plan.backup_path(path);
            std::fs::hard_link(path, &backup)?;
            DmaStorage.remove_file(path).await?;
            self.plan.record(MetadataChange::Removed {
                path: path.to_path_buf(),
                backup,
            });
        }
        operation.finish()
    }
}
