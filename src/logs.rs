//! What the broker's log events share. Broker code logs through `tracing` events with
//! structured fields (`shard`, `topic`, `partition`, `peer`, `error`, ...); which
//! subscriber writes them, and how (text, journald, JSON), is the binary's choice
//! (`shardq serve --log-format`, docs/operations.md "Logs"). A library user that
//! installs no subscriber sees no log lines, except the one line of a fatal exit.

/// The last word of a process about to exit on purpose (a shard panicked, the log can no
/// longer be trusted): an error event, and, when no subscriber was ever installed (the
/// library embedded without one, a test's child process), the same line on stderr, so
/// that an exit never goes unexplained.
pub fn fatal(message: std::fmt::Arguments<'_>) {
    tracing::error!(fatal = true, "fatal: {message}");
    if !tracing::dispatcher::has_been_set() {
        eprintln!("shardq: fatal: {message}");
    }
}
