//! The broker's data directory: the lock that keeps a second broker out, the layout
//! version, and where topics live.
//!
//! ```text
//! <data-dir>/lock              flock(LOCK_EX) held while the broker runs; holds its pid
//! <data-dir>/layout            "shardq-layout 1": the directory format's version
//! <data-dir>/direct-io-probe   4 KiB, opened with O_DIRECT at start (glommio probe)
//! <data-dir>/topics/<topic>/   one directory per topic (docs/storage.md)
//! ```
//!
//! Topics live under their own subdirectory so that no file the broker owns can ever
//! share a name with a topic. Runs on the starting thread, before any shard exists; the
//! lock is held (by the open descriptor in `DataDirectory`) until the broker has stopped.
//!
//! Why a lock at all: two brokers on one directory both append to the same segment files
//! at the offsets each believes are next; each overwrites what the other acknowledged.
//! `flock` is released by the kernel when the holder dies, so a crashed broker never
//! leaves a stale lock behind (the pid in the file is for the error message only).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::validate_topic_name;

pub const LOCK_FILE: &str = "lock";
pub const LAYOUT_FILE: &str = "layout";
pub const PROBE_FILE: &str = "direct-io-probe";
pub const TOPICS_DIRECTORY: &str = "topics";
/// The data directory format this broker reads and writes.
pub const LAYOUT_VERSION: u32 = 1;
const LAYOUT_PREFIX: &str = "shardq-layout ";
/// The probe file's name before layout 1.
const LEGACY_PROBE_FILE: &str = ".direct-io-probe";

/// Where a data directory keeps its topics.
pub fn topics_directory(data_dir: &Path) -> PathBuf {
    data_dir.join(TOPICS_DIRECTORY)
}

#[derive(Debug)]
pub enum DataDirectoryError {
    Io {
        operation: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the lock.
    Locked {
        path: PathBuf,
        /// What the holder wrote into the lock file (its pid), when readable.
        holder_pid: Option<u32>,
    },
    /// The directory was written in a format this broker does not read.
    Layout { path: PathBuf, found: String },
}

impl std::fmt::Display for DataDirectoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataDirectoryError::Io {
                operation,
                path,
                source,
            } => write!(f, "{operation} {}: {source}", path.display()),
            DataDirectoryError::Locked { path, holder_pid } => {
                write!(
                    f,
                    "data directory {} is in use by another shardq",
                    path.display()
                )?;
                match holder_pid {
                    Some(pid) => write!(f, " (pid {pid})")?,
                    None => write!(f, " (pid unknown)")?,
                }
                write!(
                    f,
                    "; two brokers on one directory would overwrite each other's data"
                )
            }
            DataDirectoryError::Layout { path, found } => write!(
                f,
                "data directory {} has layout {found:?}; this shardq reads layout {LAYOUT_VERSION}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for DataDirectoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataDirectoryError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(
    operation: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> DataDirectoryError {
    let path = path.to_path_buf();
    move |source| DataDirectoryError::Io {
        operation,
        path,
        source,
    }
}

/// A data directory this process has locked and brought to the current layout.
#[derive(Debug)]
pub struct DataDirectory {
    pub path: PathBuf,
    /// Holding the descriptor holds the lock.
    _lock: File,
}

impl DataDirectory {
    /// Creates the directory (0700) if missing, takes the lock, and checks or writes the
    /// layout. Nothing in the directory is touched before the lock is held.
    pub fn open(path: &Path) -> Result<DataDirectory, DataDirectoryError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_error("creating data directory", path))?;
        // Absolute from here on: glommio resolves some relative paths against a
        // descriptor rather than the working directory, and messages read better anyway.
        let path = std::fs::canonicalize(path).map_err(io_error("resolving", path))?;
        let lock = lock(&path)?;
        upgrade_layout(&path)?;
        Ok(DataDirectory { path, _lock: lock })
    }

    /// Writes the probe file glommio needs: opening an existing file of at least 512
    /// bytes with O_DIRECT before any new one keeps its polled-I/O probe from misfiring
    /// (glommio issues 605 and 670; docs/storage.md, Directory layout).
    pub fn probe_file(&self) -> Result<PathBuf, DataDirectoryError> {
        let path = self.path.join(PROBE_FILE);
        std::fs::write(&path, vec![0u8; 4096]).map_err(io_error("writing", &path))?;
        Ok(path)
    }
}

fn lock(data_dir: &Path) -> Result<File, DataDirectoryError> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("opening lock file", &path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_error("locking", &path)(error));
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(DataDirectoryError::Locked {
            path: data_dir.to_path_buf(),
            holder_pid: text.trim().parse().ok(),
        });
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_error("writing lock file", &path))?;
    Ok(file)
}

fn sync_directory(path: &Path) -> Result<(), DataDirectoryError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("syncing directory", path))
}

/// Brings a directory written before layout files existed (topics directly in the data
/// directory) to layout 1 by moving each topic under `topics/`; refuses any other layout.
/// Each move is one rename, so a crash part-way leaves every topic whole, in one place or
/// the other, and the next start finishes the job (the layout file is written last).
fn upgrade_layout(data_dir: &Path) -> Result<(), DataDirectoryError> {
    let layout_path = data_dir.join(LAYOUT_FILE);
    // A directory there is a topic of the old layout called "layout".
    let layout = if layout_path.is_dir() {
        Err(std::io::ErrorKind::NotFound.into())
    } else {
        std::fs::read_to_string(&layout_path)
    };
    match layout {
        Ok(text) => {
            let version = text
                .trim()
                .strip_prefix(LAYOUT_PREFIX)
                .and_then(|version| version.parse::<u32>().ok());
            if version != Some(LAYOUT_VERSION) {
                return Err(DataDirectoryError::Layout {
                    path: data_dir.to_path_buf(),
                    found: text.trim().to_owned(),
                });
            }
            let topics = topics_directory(data_dir);
            if !topics.is_dir() {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&topics)
                    .map_err(io_error("creating", &topics))?;
                sync_directory(data_dir)?;
            }
            return Ok(());
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("reading", &layout_path)(error)),
    }
    let topics = topics_directory(data_dir);
    if !topics.is_dir() {
        DirBuilder::new()
            .mode(0o700)
            .create(&topics)
            .map_err(io_error("creating", &topics))?;
    }
    let entries = std::fs::read_dir(data_dir).map_err(io_error("listing", data_dir))?;
    let mut moved = 0usize;
    for entry in entries {
        let entry = entry.map_err(io_error("listing", data_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let from = entry.path();
        let is_legacy_topic = validate_topic_name(name).is_ok()
            && name != TOPICS_DIRECTORY
            && from.is_dir()
            && from.join(crate::shard::TOPIC_METADATA_FILE).exists();
        if is_legacy_topic {
            let to = topics.join(name);
            std::fs::rename(&from, &to).map_err(io_error("moving topic", &from))?;
            moved += 1;
        }
    }
    let _ = std::fs::remove_file(data_dir.join(LEGACY_PROBE_FILE));
    if moved > 0 {
        tracing::info!(
            data_dir = %data_dir.display(),
            moved,
            layout = LAYOUT_VERSION,
            "moved {moved} topic directories of {} under {TOPICS_DIRECTORY}/ (layout {LAYOUT_VERSION})",
            data_dir.display()
        );
    }
    sync_directory(&topics)?;
    sync_directory(data_dir)?;
    let temporary = data_dir.join(format!("{LAYOUT_FILE}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io_error("writing", &temporary))?;
    file.write_all(format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error("writing", &temporary))?;
    std::fs::rename(&temporary, &layout_path).map_err(io_error("writing", &layout_path))?;
    sync_directory(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_with_the_holders_pid_and_released_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let first = DataDirectory::open(root.path()).unwrap();
        let error = DataDirectory::open(root.path()).unwrap_err();
        match &error {
            DataDirectoryError::Locked { path, holder_pid } => {
                assert_eq!(path, &std::fs::canonicalize(root.path()).unwrap());
                assert_eq!(*holder_pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&root.path().display().to_string())
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDirectory::open(root.path()).expect("the lock goes with its holder");
    }

    #[test]
    fn created_directories_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("a/b");
        let directory = DataDirectory::open(&data).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&topics_directory(&data)), 0o700);
        assert_eq!(mode(&data.join(LOCK_FILE)), 0o600);
        assert_eq!(mode(&data.join(LAYOUT_FILE)), 0o600);
        drop(directory);
    }

    #[test]
    fn legacy_topics_move_under_topics_and_a_topic_named_like_a_broker_file_is_safe() {
        let root = tempfile::tempdir().unwrap();
        for topic in ["orders", "lock", "layout"] {
            let partition = root.path().join(topic).join("0");
            std::fs::create_dir_all(&partition).unwrap();
            std::fs::write(
                root.path()
                    .join(topic)
                    .join(crate::shard::TOPIC_METADATA_FILE),
                "partitions=1\n",
            )
            .unwrap();
            std::fs::write(partition.join("00000000000000000000.log"), b"data").unwrap();
        }
        // "lock" and "layout" were topics of the old layout: a directory in the way of
        // the lock file cannot be opened as one, so the old layout has to be refused
        // loudly rather than half-upgraded.
        let error = DataDirectory::open(root.path()).unwrap_err();
        assert!(
            matches!(error, DataDirectoryError::Io { .. }),
            "a topic directory named like the lock file cannot be locked: {error:?}"
        );
        std::fs::remove_dir_all(root.path().join("lock")).unwrap();
        let directory = DataDirectory::open(root.path()).unwrap();
        let topics = topics_directory(root.path());
        for topic in ["orders", "layout"] {
            assert_eq!(
                std::fs::read(topics.join(topic).join("0/00000000000000000000.log")).unwrap(),
                b"data",
                "{topic} moved whole"
            );
        }
        assert_eq!(
            std::fs::read_to_string(root.path().join(LAYOUT_FILE)).unwrap(),
            format!("shardq-layout {LAYOUT_VERSION}\n")
        );
        drop(directory);
        // Under the new layout a topic may be called "lock": it lives in topics/.
        DataDirectory::open(root.path()).unwrap();
    }

    #[test]
    fn an_unknown_layout_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(LAYOUT_FILE), "shardq-layout 99\n").unwrap();
        let error = DataDirectory::open(root.path()).unwrap_err();
        assert!(
            matches!(&error, DataDirectoryError::Layout { found, .. } if found == "shardq-layout 99"),
            "{error:?}"
        );
    }
}
