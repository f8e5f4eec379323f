//! Stream groups' committed offsets: one store per partition, on the shard that owns it.
//!
//! A stream group (Kafka-style) keeps one offset per partition: the next offset it will
//! read. `commit` answers only once the new offset is durable; the store is a small
//! append-only file in the partition's directory, `offsets`, of records
//!
//! ```text
//! payload_length u32 LE | crc32c(payload) u32 LE | payload:
//!     group_length u16 LE | group (bytes) | offset u64 LE
//! ```
//!
//! The last record of a group wins. Commits that arrive while a write is running are
//! written together by the next one (group commit: one fdatasync for all of them).
//! Recovery reads records until the first incomplete or damaged one (a torn tail from a
//! crash mid-write) and cuts the file there; nothing after it was ever answered. Once the
//! file holds many more records than groups it is rewritten whole (temp file, fsync,
//! rename, directory fsync), so it stays proportional to the number of groups.
//!
//! The file is tiny and written rarely compared to the log, so it goes through plain
//! blocking calls on the executor's blocking thread (`off_reactor`), never on the reactor.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::storage::{Notify, StorageError};

/// The store's file in a partition directory.
pub const OFFSETS_FILE: &str = "offsets";

const RECORD_HEADER_SIZE: usize = 8;

/// Compaction rewrites the file once it holds this many records more than it has groups
/// (and at least twice as many).
const RECORDS_BEFORE_COMPACTION_MIN: u64 = 1024;

/// Appends one record to `buffer`.
fn encode_record(group: &str, offset: u64, buffer: &mut Vec<u8>) {
    let payload_length = 2 + group.len() + 8;
    buffer.extend_from_slice(&(payload_length as u32).to_le_bytes());
    let crc_at = buffer.len();
    buffer.extend_from_slice(&[0; 4]);
    let payload_at = buffer.len();
    buffer.extend_from_slice(
        &u16::try_from(group.len())
            .expect("group names are at most 200 bytes")
            .to_le_bytes(),
    );
    buffer.extend_from_slice(group.as_bytes());
    buffer.extend_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&buffer[payload_at..]);
    buffer[crc_at..payload_at].copy_from_slice(&crc.to_le_bytes());
}

/// Reads records from the start of `bytes`: the committed offsets, how many records, and
/// how many bytes are whole records (the rest is a torn or damaged tail).
fn decode_records(bytes: &[u8]) -> (BTreeMap<String, u64>, u64, usize) {
    let mut committed = BTreeMap::new();
    let mut records = 0;
    let mut position = 0;
    while let Some(header) = bytes.get(position..position + RECORD_HEADER_SIZE) {
        let payload_length = u32::from_le_bytes(header[..4].try_into().expect("four")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("four"));
        let start = position + RECORD_HEADER_SIZE;
        let Some(payload) = bytes.get(start..start + payload_length) else {
            break;
        };
        if payload_length < 10 || crc32c::crc32c(payload) != crc {
            break;
        }
        let group_length = u16::from_le_bytes(payload[..2].try_into().expect("two")) as usize;
        if 2 + group_length + 8 != payload_length {
            break;
        }
        let Ok(group) = std::str::from_utf8(&payload[2..2 + group_length]) else {
            break;
        };
        let offset = u64::from_le_bytes(payload[2 + group_length..].try_into().expect("eight"));
        committed.insert(group.to_owned(), offset);
        records += 1;
        position = start + payload_length;
    }
    (committed, records, position)
}

/// Why a commit was not made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The partition holds `groups_max` groups already.
    TooManyGroups { groups_max: u32 },
    /// A write or fdatasync of the offsets file failed; the store refuses commits until
    /// the broker restarts (what was answered before is durable).
    Storage(String),
}

/// Committed offsets of one partition's stream groups.
pub struct OffsetStore {
    path: PathBuf,
    /// Durable commits: what readers see.
    committed: RefCell<BTreeMap<String, u64>>,
    groups_max: u32,
    file: RefCell<Arc<std::fs::File>>,
    records_in_file: Cell<u64>,
    /// Encoded records waiting for the next write, and the commits they carry.
    pending_bytes: RefCell<Vec<u8>>,
    pending: RefCell<Vec<(String, u64)>>,
    /// Groups with a commit queued or being written but none durable yet: counted once
    /// each against `groups_max`, however many of their commits wait.
    new_groups: RefCell<BTreeSet<String>>,
    /// Commits numbered as they are queued; `durable_seq` is the last one on disk.
    queued_seq: Cell<u64>,
    durable_seq: Cell<u64>,
    writing: Cell<bool>,
    failed: RefCell<Option<String>>,
    written: Notify,
}

impl OffsetStore {
    /// Opens (or creates) the store in `directory`, cutting a torn tail. Blocking: call it
    /// off the reactor.
    pub fn open_blocking(directory: &Path, groups_max: u32) -> Result<OffsetStore, StorageError> {
        let path = directory.join(OFFSETS_FILE);
        // A compaction interrupted by a crash leaves its temporary file: never renamed,
        // so the store is the old file; the leftover only takes space.
        let temporary = path.with_extension("tmp");
        match std::fs::remove_file(&temporary) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::io(
                    "removing a leftover offsets.tmp",
                    &temporary,
                    source,
                ))
            }
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StorageError::io("reading committed offsets", &path, source))
            }
        };
        let (committed, records, valid) = decode_records(&bytes);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| StorageError::io("opening committed offsets", &path, source))?;
        if valid < bytes.len() {
            // A record torn by a crash was never answered: cut it, so the next record
            // starts on a record boundary.
            file.set_len(valid as u64)
                .and_then(|()| file.sync_all())
                .map_err(|source| StorageError::io("cutting committed offsets", &path, source))?;
            tracing::warn!(
                path = %path.display(),
                bytes_cut = bytes.len() - valid,
                "cut {} bytes of an incomplete commit record",
                bytes.len() - valid
            );
        }
        Ok(OffsetStore {
            path,
            committed: RefCell::new(committed),
            groups_max,
            file: RefCell::new(Arc::new(file)),
            records_in_file: Cell::new(records),
            pending_bytes: RefCell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
            new_groups: RefCell::new(BTreeSet::new()),
            queued_seq: Cell::new(0),
            durable_seq: Cell::new(0),
            writing: Cell::new(false),
            failed: RefCell::new(None),
            written: Notify::new(),
        })
    }

    pub fn committed(&self, group: &str) -> Option<u64> {
        self.committed.borrow().get(group).copied()
    }

    /// Every group's committed offset, by name.
    pub fn groups(&self) -> Vec<(String, u64)> {
        self.committed
            .borrow()
            .iter()
            .map(|(group, offset)| (group.clone(), *offset))
            .collect()
    }

    /// Records `offset` as `group`'s position; resolves once it is durable.
    pub async fn commit(self: &Rc<Self>, group: &str, offset: u64) -> Result<(), CommitError> {
        if let Some(reason) = self.failed.borrow().clone() {
            return Err(CommitError::Storage(reason));
        }
        let known =
            self.committed.borrow().contains_key(group) || self.new_groups.borrow().contains(group);
        if !known {
            let groups = self.committed.borrow().len() + self.new_groups.borrow().len();
            if groups >= self.groups_max as usize {
                return Err(CommitError::TooManyGroups {
                    groups_max: self.groups_max,
                });
            }
            self.new_groups.borrow_mut().insert(group.to_owned());
        }
        encode_record(group, offset, &mut self.pending_bytes.borrow_mut());
        self.pending.borrow_mut().push((group.to_owned(), offset));
        let seq = self.queued_seq.get() + 1;
        self.queued_seq.set(seq);
        if !self.writing.get() {
            self.writing.set(true);
            glommio::spawn_local(Rc::clone(self).write_pending()).detach();
        }
        loop {
            let written = self.written.listen();
            if self.durable_seq.get() >= seq {
                return Ok(());
            }
            if let Some(reason) = self.failed.borrow().clone() {
                return Err(CommitError::Storage(reason));
            }
            let _ = written.await;
        }
    }

    /// Writes what is queued, one write and one fdatasync per round, until nothing is.
    async fn write_pending(self: Rc<Self>) {
        loop {
            let bytes = std::mem::take(&mut *self.pending_bytes.borrow_mut());
            if bytes.is_empty() {
                break;
            }
            let commits = std::mem::take(&mut *self.pending.borrow_mut());
            let seq = self.queued_seq.get();
            let file = Arc::clone(&self.file.borrow());
            let written = off_reactor(move || {
                let mut handle: &std::fs::File = &file;
                handle.write_all(&bytes)?;
                file.sync_data()
            })
            .await;
            if let Err(error) = written {
                let reason = format!("writing {}: {error}", self.path.display());
                tracing::error!(
                    path = %self.path.display(),
                    error = %error,
                    "{reason}; this partition refuses commits until a restart"
                );
                *self.failed.borrow_mut() = Some(reason);
                break;
            }
            {
                let mut committed = self.committed.borrow_mut();
                let mut new_groups = self.new_groups.borrow_mut();
                for (group, offset) in commits.iter() {
                    committed.insert(group.clone(), *offset);
                    if new_groups.remove(group) {
                        // Once per group and partition: its first commit is durable.
                        tracing::info!(
                            path = %self.path.display(),
                            group = %group,
                            offset = *offset,
                            "stream group {group:?} created on this partition"
                        );
                    }
                }
            }
            self.records_in_file
                .set(self.records_in_file.get() + commits.len() as u64);
            self.durable_seq.set(seq);
            self.written.notify_all();
            if let Err(error) = self.compact_if_due().await {
                let reason = format!("compacting {}: {error}", self.path.display());
                tracing::error!(
                    path = %self.path.display(),
                    error = %error,
                    "{reason}; this partition refuses commits until a restart"
                );
                *self.failed.borrow_mut() = Some(reason);
                break;
            }
        }
        self.writing.set(false);
        self.written.notify_all();
    }

    /// Rewrites the file with one record per group once it holds many more.
    async fn compact_if_due(&self) -> std::io::Result<()> {
        let groups = self.committed.borrow().len() as u64;
        let records = self.records_in_file.get();
        if records < RECORDS_BEFORE_COMPACTION_MIN.max(2 * groups) + groups {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for (group, offset) in self.committed.borrow().iter() {
            encode_record(group, *offset, &mut bytes);
        }
        let path = self.path.clone();
        let file = off_reactor(move || -> std::io::Result<std::fs::File> {
            let temporary = path.with_extension("tmp");
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            if let Some(directory) = path.parent() {
                std::fs::File::open(directory)?.sync_all()?;
            }
            std::fs::OpenOptions::new().append(true).open(&path)
        })
        .await?;
        *self.file.borrow_mut() = Arc::new(file);
        self.records_in_file.set(groups);
        Ok(())
    }
}

async fn off_reactor<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    crate::storage::run_blocking(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F, Fut>(body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .spawn(body)
            .expect("executor starts")
            .join()
            .expect("executor runs");
    }

    #[test]
    fn records_decode_until_a_torn_or_damaged_one() {
        let mut bytes = Vec::new();
        encode_record("a", 5, &mut bytes);
        encode_record("b", 7, &mut bytes);
        encode_record("a", 9, &mut bytes);
        let whole = bytes.len();
        let (committed, records, valid) = decode_records(&bytes);
        assert_eq!(records, 3);
        assert_eq!(valid, whole);
        assert_eq!(committed.get("a"), Some(&9));
        assert_eq!(committed.get("b"), Some(&7));
        // Every cut inside the last record keeps the first two.
        let second_end = whole - (RECORD_HEADER_SIZE + 2 + 1 + 8);
        for cut in second_end..whole {
            let (committed, records, valid) = decode_records(&bytes[..cut]);
            assert_eq!((records, valid), (2, second_end), "cut at {cut}");
            assert_eq!(committed.get("a"), Some(&5));
        }
        // A flipped bit in the last record's offset fails its CRC.
        let mut damaged = bytes.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(decode_records(&damaged).1, 2);
    }

    #[test]
    fn commits_are_durable_survive_reopen_and_a_torn_tail_is_cut() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().to_path_buf();
        let first = path.clone();
        run(move || async move {
            let store = Rc::new(OffsetStore::open_blocking(&first, 10).unwrap());
            assert_eq!(store.committed("billing"), None);
            // Commits racing each other are written together and all answered.
            let commits: Vec<_> = (0..20u64)
                .map(|index| {
                    let store = Rc::clone(&store);
                    glommio::spawn_local(async move {
                        let group = format!("g{}", index % 4);
                        store.commit(&group, index).await
                    })
                })
                .collect();
            for commit in commits {
                commit.await.unwrap();
            }
            assert_eq!(store.committed("g3"), Some(19));
            assert_eq!(store.groups().len(), 4);
        });
        // A crash mid-write leaves part of a record.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path.join(OFFSETS_FILE))
            .unwrap();
        file.write_all(&[20, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        run(move || async move {
            let store = Rc::new(OffsetStore::open_blocking(&path, 10).unwrap());
            assert_eq!(store.committed("g0"), Some(16));
            assert_eq!(store.committed("g3"), Some(19));
            // The cut tail does not swallow the next commit.
            store.commit("g0", 100).await.unwrap();
            drop(store);
            let store = OffsetStore::open_blocking(&path, 10).unwrap();
            assert_eq!(store.committed("g0"), Some(100));
        });
    }

    #[test]
    fn groups_past_the_limit_are_refused_and_compaction_keeps_every_group() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().to_path_buf();
        run(move || async move {
            let store = Rc::new(OffsetStore::open_blocking(&path, 3).unwrap());
            for group in ["a", "b", "c"] {
                store.commit(group, 1).await.unwrap();
            }
            assert_eq!(
                store.commit("d", 1).await,
                Err(CommitError::TooManyGroups { groups_max: 3 })
            );
            // Known groups still commit; enough commits to compact twice.
            for offset in 0..(3 * RECORDS_BEFORE_COMPACTION_MIN) {
                store.commit("a", offset).await.unwrap();
            }
            let size = std::fs::metadata(path.join(OFFSETS_FILE)).unwrap().len();
            assert!(
                size < RECORDS_BEFORE_COMPACTION_MIN * 2 * 19,
                "compaction kept the file small: {size} bytes"
            );
            drop(store);
            let store = OffsetStore::open_blocking(&path, 3).unwrap();
            assert_eq!(
                store.groups(),
                vec![
                    ("a".to_owned(), 3 * RECORDS_BEFORE_COMPACTION_MIN - 1),
                    ("b".to_owned(), 1),
                    ("c".to_owned(), 1)
                ]
            );
        });
    }

    /// Two commits of one new group waiting together count it once: a second new group
    /// still fits under the limit. And a leftover `offsets.tmp` goes at open.
    #[test]
    fn a_new_group_with_two_pending_commits_counts_once() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().to_path_buf();
        std::fs::write(path.join("offsets.tmp"), b"half a compaction").unwrap();
        let opened = path.clone();
        run(move || async move {
            let store = Rc::new(OffsetStore::open_blocking(&opened, 2).unwrap());
            assert!(!opened.join("offsets.tmp").exists());
            let commits: Vec<_> = [("a", 1), ("a", 2), ("b", 1)]
                .into_iter()
                .map(|(group, offset)| {
                    let store = Rc::clone(&store);
                    glommio::spawn_local(async move { store.commit(group, offset).await })
                })
                .collect();
            for commit in commits {
                commit.await.unwrap();
            }
            assert_eq!(store.groups().len(), 2);
            assert_eq!(
                store.commit("c", 1).await,
                Err(CommitError::TooManyGroups { groups_max: 2 })
            );
        });
    }
}
