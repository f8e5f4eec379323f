//! One queue group's files: its journal (in segments) and its snapshot, under
//! `<partition dir>/groups/<group>/`.
//!
//! ```text
//! groups/<group>/journal-<first seq, 20 digits>   records from that seq on (delivery::journal)
//!               /snapshot                         the state through some seq
//!               /snapshot.tmp                     a snapshot being written (deleted at start-up)
//!               /settings                         the group's own settings (AlterGroup)
//!               /settings.tmp                     settings being written (deleted at start-up)
//! ```
//!
//! What it is: the I/O half of a queue group, run on the shard that owns the partition.
//! The [`JournalWriter`] appends encoded records in memory and a flusher task writes them
//! with io_uring (glommio `BufferedFile`) and fdatasyncs: group commit, one sync covering
//! every record appended while the previous one ran, like the partition log. Recovery
//! reads (start-up only) and directory listings run on the executor's blocking thread.
//!
//! Contract: `wait_durable(seq)` resolves once every record through `seq` is on disk.
//! Segments are written in order and each is synced before the next one is written to,
//! so a torn tail can only be at the end of the last segment that has data: recovery cuts
//! it there and drops anything after. At a snapshot the writer rotates (records after the
//! snapshot's seq go to a new segment); once the snapshot is durable the older segments
//! are deleted.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{BufferedFile, Directory, OpenOptions};

use crate::delivery::{encode_record, JournalRecord};
use crate::storage::{FailurePolicy, Notify, StorageError, EXIT_STORAGE_FAILED};

/// Directory of a partition that holds its queue groups' directories.
pub const GROUPS_DIRECTORY: &str = "groups";
pub const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TEMPORARY_FILE: &str = "snapshot.tmp";
const JOURNAL_PREFIX: &str = "journal-";
/// The group's own settings, `key=value` lines (`settings::group_file_text`); absent:
/// the group runs with its topic's settings.
pub const SETTINGS_FILE: &str = "settings";
const SETTINGS_TEMPORARY_FILE: &str = "settings.tmp";

pub fn journal_file_name(first_seq: u64) -> String {
    format!("{JOURNAL_PREFIX}{first_seq:020}")
}

fn parse_journal_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(JOURNAL_PREFIX)?;
    (digits.len() == 20 && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// What start-up finds in a group's directory.
#[derive(Debug, Default)]
pub struct GroupFiles {
    pub snapshot: Option<Vec<u8>>,
    /// Journal segments in seq order: (first seq, path, bytes).
    pub journals: Vec<(u64, PathBuf, Vec<u8>)>,
    /// The `settings` file's text, when the group has one.
    pub settings: Option<String>,
}

impl GroupFiles {
    /// Every segment's bytes, in order: what `QueueGroup::recover` replays.
    pub fn journal_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.journals.iter().map(|(_, _, b)| b.len()).sum());
        for (_, _, segment) in &self.journals {
            bytes.extend_from_slice(segment);
        }
        bytes
    }
}

/// The group directories of a partition: `(group name, path)`, sorted by name. Blocking.
pub fn list_groups(partition_directory: &Path) -> Result<Vec<(String, PathBuf)>, StorageError> {
    let directory = partition_directory.join(GROUPS_DIRECTORY);
    let entries = match std::fs::read_dir(&directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StorageError::io("listing queue groups", &directory, source)),
    };
    let mut groups = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|source| StorageError::io("listing queue groups", &directory, source))?;
        if !entry.path().is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if super::settings::validate_group_name(&name).is_err() {
            continue;
        }
        groups.push((name, entry.path()));
    }
    groups.sort();
    Ok(groups)
}

/// Reads a group's snapshot and journal segments, removing a half-written snapshot.
/// Blocking.
pub fn read_group_files(directory: &Path) -> Result<GroupFiles, StorageError> {
    for (temporary, what) in [
        (SNAPSHOT_TEMPORARY_FILE, "removing a half-written snapshot"),
        (
            SETTINGS_TEMPORARY_FILE,
            "removing half-written group settings",
        ),
    ] {
        let temporary = directory.join(temporary);
        match std::fs::remove_file(&temporary) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::io(what, &temporary, source)),
        }
    }
    let settings_path = directory.join(SETTINGS_FILE);
    let settings = match std::fs::read(&settings_path) {
        Ok(bytes) => Some(
            String::from_utf8(bytes).map_err(|error| StorageError::Corrupt {
                path: settings_path.clone(),
                position: error.utf8_error().valid_up_to() as u64,
                reason: "queue group settings are not UTF-8".into(),
            })?,
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(StorageError::io(
                "reading queue group settings",
                &settings_path,
                source,
            ))
        }
    };
    let snapshot_path = directory.join(SNAPSHOT_FILE);
    let snapshot = match std::fs::read(&snapshot_path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(StorageError::io(
                "reading a queue group snapshot",
                &snapshot_path,
                source,
            ))
        }
    };
    let mut journals = Vec::new();
    let entries = std::fs::read_dir(directory)
        .map_err(|source| StorageError::io("listing a queue group", directory, source))?;
    for entry in entries {
        let entry =
            entry.map_err(|source| StorageError::io("listing a queue group", directory, source))?;
        let Some(first_seq) = entry.file_name().to_str().and_then(parse_journal_file_name) else {
            continue;
        };
        let path = entry.path();
        let bytes = std::fs::read(&path)
            .map_err(|source| StorageError::io("reading a queue group journal", &path, source))?;
        journals.push((first_seq, path, bytes));
    }
    journals.sort_by_key(|(first_seq, _, _)| *first_seq);
    Ok(GroupFiles {
        snapshot,
        journals,
        settings,
    })
}

/// After recovery found `valid_bytes` of whole records in the concatenated journal: cuts
/// the segment holding the end there and deletes the segments after it (a torn tail was
/// never answered: answers wait for durability). Returns the segment to append to and
/// its length: the last one kept, or none when there is none. Blocking.
pub fn cut_journal(
    directory: &Path,
    files: &GroupFiles,
    valid_bytes: usize,
) -> Result<Option<(u64, u64)>, StorageError> {
    let mut start = 0usize;
    let mut keep: Option<(u64, u64)> = None;
    for (first_seq, path, bytes) in &files.journals {
        let end = start + bytes.len();
        if start > valid_bytes || (start == valid_bytes && keep.is_some()) {
            tracing::warn!(
                group_directory = %directory.display(),
                path = %path.display(),
                "dropping journal segment {} past a damaged tail",
                path.display()
            );
            std::fs::remove_file(path).map_err(|source| {
                StorageError::io("removing a journal segment past a torn tail", path, source)
            })?;
        } else {
            let length = valid_bytes.min(end) - start;
            if length < bytes.len() {
                tracing::warn!(
                    path = %path.display(),
                    bytes_kept = length,
                    bytes_found = bytes.len(),
                    "cutting a torn queue group journal tail, {} bytes of {} kept",
                    length,
                    bytes.len()
                );
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|source| StorageError::io("opening a journal", path, source))?;
                file.set_len(length as u64).map_err(|source| {
                    StorageError::io("cutting a torn journal tail", path, source)
                })?;
                file.sync_all()
                    .map_err(|source| StorageError::io("syncing a journal", path, source))?;
            }
            if length == bytes.len() {
                // Read back through the page cache: what a crashed process wrote may not
                // be on disk yet. The writer counts it durable, so make it so first (the
                // partition log does the same for its recovered tail).
                std::fs::File::open(path)
                    .and_then(|file| file.sync_data())
                    .map_err(|source| StorageError::io("syncing a journal", path, source))?;
            }
            keep = Some((*first_seq, length as u64));
        }
        start = end;
    }
    if files.snapshot.is_some() {
        let snapshot = directory.join(SNAPSHOT_FILE);
        std::fs::File::open(&snapshot)
            .and_then(|file| file.sync_data())
            .map_err(|source| StorageError::io("syncing a snapshot", &snapshot, source))?;
    }
    // The segments' and the snapshot's entries (a rename the crash may have left
    // unsynced), and any removal above.
    sync_directory_blocking(directory)?;
    Ok(keep)
}

fn sync_directory_blocking(directory: &Path) -> Result<(), StorageError> {
    std::fs::File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| StorageError::io("syncing a directory", directory, source))
}

/// Creates `<partition>/groups/<group>`, empty, and makes its entry durable. A directory
/// left there (a create whose `Created` record never became durable, or an interrupted
/// delete) is removed first: its old journal segments must not be appended to, or read
/// back as this group's. Blocking.
pub fn create_group_directory(directory: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(directory) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StorageError::io(
                "removing a leftover queue group directory",
                directory,
                source,
            ))
        }
    }
    std::fs::create_dir_all(directory).map_err(|source| {
        StorageError::io("creating a queue group directory", directory, source)
    })?;
    let groups = directory.parent().expect("a group directory has a parent");
    sync_directory_blocking(groups)?;
    sync_directory_blocking(groups.parent().expect("groups/ lies in a partition"))
}

/// Replaces the group's `settings` file with `text`, durably: written to a temporary
/// file, synced, renamed over the old one, and the directory synced (a crash leaves the
/// old file or the new one, never a mix). Blocking: run it off the reactor.
pub fn write_group_settings(directory: &Path, text: &str) -> Result<(), StorageError> {
    use std::io::Write;
    let temporary = directory.join(SETTINGS_TEMPORARY_FILE);
    let mut file = std::fs::File::create(&temporary)
        .map_err(|source| StorageError::io("creating group settings", &temporary, source))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| StorageError::io("writing group settings", &temporary, source))?;
    drop(file);
    let path = directory.join(SETTINGS_FILE);
    std::fs::rename(&temporary, &path)
        .map_err(|source| StorageError::io("renaming group settings into place", &path, source))?;
    sync_directory_blocking(directory)
}

async fn sync_directory(directory: &Path) -> Result<(), StorageError> {
    let handle = Directory::open(directory).await.map_err(|source| {
        StorageError::io(
            "opening a directory",
            directory,
            std::io::Error::from(source),
        )
    })?;
    handle.sync().await.map_err(|source| {
        StorageError::io(
            "syncing a directory",
            directory,
            std::io::Error::from(source),
        )
    })?;
    let _ = handle.close().await;
    Ok(())
}

async fn write_all(
    file: &BufferedFile,
    bytes: Vec<u8>,
    position: u64,
    path: &Path,
) -> Result<(), StorageError> {
    let mut written = 0usize;
    let mut bytes = bytes;
    while !bytes.is_empty() {
        let length = bytes.len();
        let count = file
            .write_at(bytes.clone(), position + written as u64)
            .await
            .map_err(|source| {
                StorageError::io(
                    "writing a queue group file",
                    path,
                    std::io::Error::from(source),
                )
            })?;
        if count == 0 {
            return Err(StorageError::io(
                "writing a queue group file",
                path,
                std::io::Error::new(std::io::ErrorKind::WriteZero, "the write made no progress"),
            ));
        }
        written += count;
        bytes = if count == length {
            Vec::new()
        } else {
            bytes[count..].to_vec()
        };
    }
    Ok(())
}

/// Writes a snapshot whole: temporary file, fdatasync, rename, directory sync.
pub async fn write_snapshot(directory: &Path, bytes: Vec<u8>) -> Result<(), StorageError> {
    let temporary = directory.join(SNAPSHOT_TEMPORARY_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .buffered_open(&temporary)
        .await
        .map_err(|source| {
            StorageError::io(
                "creating a snapshot",
                &temporary,
                std::io::Error::from(source),
            )
        })?;
    let outcome = async {
        write_all(&file, bytes, 0, &temporary).await?;
        file.fdatasync().await.map_err(|source| {
            StorageError::io(
                "syncing a snapshot",
                &temporary,
                std::io::Error::from(source),
            )
        })
    }
    .await;
    let _ = file.close().await;
    outcome?;
    let target = directory.join(SNAPSHOT_FILE);
    glommio::io::rename(&temporary, &target)
        .await
        .map_err(|source| {
            StorageError::io("renaming a snapshot", &target, std::io::Error::from(source))
        })?;
    sync_directory(directory).await
}

/// Deletes the journal segments that begin before `first_seq_kept` (the snapshot covers
/// them), then syncs the directory.
pub async fn remove_journals_before(
    directory: &Path,
    first_seq_kept: u64,
) -> Result<(), StorageError> {
    let listing = directory.to_path_buf();
    let old: Vec<PathBuf> = glommio::executor()
        .spawn_blocking(move || -> Result<Vec<PathBuf>, StorageError> {
            let entries = std::fs::read_dir(&listing)
                .map_err(|source| StorageError::io("listing a queue group", &listing, source))?;
            let mut old = Vec::new();
            for entry in entries.flatten() {
                if let Some(first_seq) =
                    entry.file_name().to_str().and_then(parse_journal_file_name)
                {
                    if first_seq < first_seq_kept {
                        old.push(entry.path());
                    }
                }
            }
            Ok(old)
        })
        .await?;
    if old.is_empty() {
        return Ok(());
    }
    for path in old {
        glommio::io::remove(&path).await.map_err(|source| {
            StorageError::io(
                "removing an old journal segment",
                &path,
                std::io::Error::from(source),
            )
        })?;
    }
    sync_directory(directory).await
}

struct WriterState {
    /// Encoded records not yet taken by a round: (first seq of their segment, bytes).
    pending: Vec<(u64, Vec<u8>)>,
    /// The segment new records go to.
    current_segment: u64,
    appended_seq: u64,
    durable_seq: u64,
    failed: Option<StorageError>,
    closing: bool,
    stopped: bool,
}

/// Appends one group's journal records and makes them durable in rounds (group commit).
pub struct JournalWriter {
    directory: PathBuf,
    failure_policy: FailurePolicy,
    state: RefCell<WriterState>,
    wanted: Notify,
    durable_changed: Notify,
    flusher: RefCell<Option<glommio::task::JoinHandle<()>>>,
}

impl JournalWriter {
    /// Starts the writer of the group in `directory` (which exists): new records go to
    /// segment `segment` (first seq), which holds `length` bytes already (0: a new file).
    /// Every record through `durable_seq` is already on disk.
    pub fn start(
        directory: PathBuf,
        segment: u64,
        length: u64,
        durable_seq: u64,
        failure_policy: FailurePolicy,
    ) -> Rc<JournalWriter> {
        let writer = Rc::new(JournalWriter {
            directory,
            failure_policy,
            state: RefCell::new(WriterState {
                pending: Vec::new(),
                current_segment: segment,
                appended_seq: durable_seq,
                durable_seq,
                failed: None,
                closing: false,
                stopped: false,
            }),
            wanted: Notify::new(),
            durable_changed: Notify::new(),
            flusher: RefCell::new(None),
        });
        let flusher =
            glommio::spawn_local(Rc::clone(&writer).run_flusher(segment, length)).detach();
        *writer.flusher.borrow_mut() = Some(flusher);
        writer
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Queues a record for the next round. Records come in seq order.
    pub fn append(&self, seq: u64, record: &JournalRecord) {
        let mut state = self.state.borrow_mut();
        assert!(
            seq == state.appended_seq + 1,
            "journal records are appended in seq order: {seq} after {}",
            state.appended_seq
        );
        state.appended_seq = seq;
        let segment = state.current_segment;
        match state.pending.last_mut() {
            Some((last, bytes)) if *last == segment => encode_record(seq, record, bytes),
            _ => {
                let mut bytes = Vec::new();
                encode_record(seq, record, &mut bytes);
                state.pending.push((segment, bytes));
            }
        }
        drop(state);
        self.wanted.notify_all();
    }

    /// Records appended from now on go to a new segment whose first record is `first_seq`.
    pub fn rotate(&self, first_seq: u64) {
        let mut state = self.state.borrow_mut();
        assert_eq!(
            first_seq,
            state.appended_seq + 1,
            "a segment begins with the next record"
        );
        state.current_segment = first_seq;
    }

    pub fn durable_seq(&self) -> u64 {
        self.state.borrow().durable_seq
    }

    /// Resolves once every record through `seq` is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), StorageError> {
        loop {
            let listener = self.durable_changed.listen();
            {
                let state = self.state.borrow();
                if state.durable_seq >= seq {
                    return Ok(());
                }
                if let Some(error) = &state.failed {
                    return Err(error.clone());
                }
                if state.stopped {
                    return Err(StorageError::Closed);
                }
            }
            let _ = listener.await;
        }
    }

    /// Writes what is pending and stops the flusher.
    pub async fn close(&self) {
        self.state.borrow_mut().closing = true;
        self.wanted.notify_all();
        let flusher = self.flusher.borrow_mut().take();
        if let Some(flusher) = flusher {
            flusher.await;
        }
    }

    async fn run_flusher(self: Rc<Self>, segment: u64, length: u64) {
        let mut open: Option<(u64, BufferedFile, PathBuf, u64)> = None;
        let mut first = Some((segment, length));
        loop {
            let listener = self.wanted.listen();
            let taken = {
                let mut state = self.state.borrow_mut();
                if !state.pending.is_empty() {
                    Some((std::mem::take(&mut state.pending), state.appended_seq))
                } else if state.closing {
                    state.stopped = true;
                    break;
                } else {
                    None
                }
            };
            let Some((chunks, target_seq)) = taken else {
                let _ = listener.await;
                continue;
            };
            let round = async {
                for (segment, bytes) in chunks {
                    if open.as_ref().map(|(open_segment, ..)| *open_segment) != Some(segment) {
                        if let Some((_, file, _, _)) = open.take() {
                            let _ = file.close().await;
                        }
                        let path = self.directory.join(journal_file_name(segment));
                        let position = match first.take() {
                            Some((first_segment, length)) if first_segment == segment => length,
                            _ => 0,
                        };
                        let file = OpenOptions::new()
                            .write(true)
                            .create(true)
                            .buffered_open(&path)
                            .await
                            .map_err(|source| {
                                StorageError::io(
                                    "opening a journal",
                                    &path,
                                    std::io::Error::from(source),
                                )
                            })?;
                        if position == 0 {
                            // A new segment: its directory entry must be durable before
                            // any record in it counts as durable.
                            sync_directory(&self.directory).await?;
                        }
                        open = Some((segment, file, path, position));
                    }
                    let (_, file, path, position) = open.as_mut().expect("opened above");
                    let length = bytes.len() as u64;
                    write_all(file, bytes, *position, path).await?;
                    *position += length;
                    // Each segment is durable before the next one is written to, so a torn
                    // tail can only be the last segment's.
                    file.fdatasync().await.map_err(|source| {
                        StorageError::io("syncing a journal", path, std::io::Error::from(source))
                    })?;
                }
                Ok::<(), StorageError>(())
            }
            .await;
            match round {
                Ok(()) => {
                    self.state.borrow_mut().durable_seq = target_seq;
                    self.durable_changed.notify_all();
                }
                Err(error) => {
                    {
                        let mut state = self.state.borrow_mut();
                        state.failed = Some(error.clone());
                        state.stopped = true;
                    }
                    self.durable_changed.notify_all();
                    tracing::error!(
                        group_directory = %self.directory.display(),
                        error = %error,
                        "queue group journal: {error}"
                    );
                    if self.failure_policy == FailurePolicy::ExitProcess {
                        crate::logs::fatal(format_args!(
                            "a queue group journal can no longer be trusted"
                        ));
                        std::process::exit(EXIT_STORAGE_FAILED);
                    }
                    break;
                }
            }
        }
        if let Some((_, file, _, _)) = open.take() {
            let _ = file.close().await;
        }
        self.durable_changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_segment_names_sort_by_first_seq() {
        assert_eq!(journal_file_name(17), "journal-00000000000000000017");
        assert_eq!(parse_journal_file_name(&journal_file_name(17)), Some(17));
        assert_eq!(parse_journal_file_name("journal-17"), None);
        assert_eq!(parse_journal_file_name("snapshot"), None);
    }

    fn files_of(directory: &Path, segments: &[(u64, &[u8])]) -> GroupFiles {
        let mut files = GroupFiles::default();
        for (first_seq, bytes) in segments {
            let path = directory.join(journal_file_name(*first_seq));
            std::fs::write(&path, bytes).unwrap();
            files.journals.push((*first_seq, path, bytes.to_vec()));
        }
        files
    }

    #[test]
    fn a_torn_journal_tail_is_cut_and_later_segments_dropped() {
        let directory = tempfile::tempdir().unwrap();
        let files = files_of(
            directory.path(),
            &[(1, b"aaaa"), (5, b"bbbbbb"), (9, b"cc")],
        );
        // Valid through 2 bytes into the second segment.
        let keep = cut_journal(directory.path(), &files, 6).unwrap();
        assert_eq!(keep, Some((5, 2)));
        assert_eq!(std::fs::read(&files.journals[0].1).unwrap(), b"aaaa");
        assert_eq!(std::fs::read(&files.journals[1].1).unwrap(), b"bb");
        assert!(!files.journals[2].1.exists());
        // Everything valid: nothing changes, the last segment is appended to.
        let directory = tempfile::tempdir().unwrap();
        let files = files_of(directory.path(), &[(1, b"aaaa"), (5, b"bb")]);
        assert_eq!(
            cut_journal(directory.path(), &files, 6).unwrap(),
            Some((5, 2))
        );
        // Valid exactly to a segment's end: the next (torn) one goes.
        let directory = tempfile::tempdir().unwrap();
        let files = files_of(directory.path(), &[(1, b"aaaa"), (5, b"xx")]);
        assert_eq!(
            cut_journal(directory.path(), &files, 4).unwrap(),
            Some((1, 4))
        );
        assert!(!files.journals[1].1.exists());
    }

    #[test]
    fn group_settings_are_replaced_whole_and_a_half_written_file_is_dropped() {
        let directory = tempfile::tempdir().unwrap();
        assert_eq!(read_group_files(directory.path()).unwrap().settings, None);
        write_group_settings(directory.path(), "queue_retry_delay_ms_min=20\n").unwrap();
        write_group_settings(directory.path(), "queue_retry_delay_ms_max=40\n").unwrap();
        std::fs::write(directory.path().join(SETTINGS_TEMPORARY_FILE), "torn").unwrap();
        let files = read_group_files(directory.path()).unwrap();
        assert_eq!(
            files.settings.as_deref(),
            Some("queue_retry_delay_ms_max=40\n")
        );
        assert!(!directory.path().join(SETTINGS_TEMPORARY_FILE).exists());
    }

    #[test]
    fn creating_a_group_clears_a_leftover_directory() {
        let partition = tempfile::tempdir().unwrap();
        let directory = partition.path().join(GROUPS_DIRECTORY).join("billing");
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(directory.join(journal_file_name(1)), b"old records").unwrap();
        std::fs::write(directory.join(SNAPSHOT_FILE), b"old snapshot").unwrap();
        create_group_directory(&directory).unwrap();
        assert!(directory.is_dir());
        assert_eq!(std::fs::read_dir(&directory).unwrap().count(), 0);
    }
}
