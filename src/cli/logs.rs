//! `shardq serve`'s log output: the `tracing` subscriber that writes the broker's events
//! to stderr, one line each.
//!
//! - `text` (default): `2026-01-02T03:04:05.678901Z  INFO target: message field=value`,
//!   the time in UTC (RFC 3339, microseconds). Under journald (stderr is the stream
//!   `$JOURNAL_STREAM` names, as systemd documents) there is no time (the journal stamps
//!   each line) and each line starts with its syslog priority, `<3>` error to `<7>`
//!   debug (sd-daemon(3)), so that `journalctl -p` filters by level.
//! - `json`: one object per line: `timestamp`, `level`, `target`, `message` and each
//!   field at the top level.
//!
//! The level: `--log-level` if given, else the filter in `$SHARDQ_LOG` (tracing's
//! `EnvFilter` syntax, e.g. `info,shardq::storage=debug`), else `info`.
//!
//! Client commands do not use this: their errors are command output (`shardq: ...`).

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable holding a level filter, used when `--log-level` is not given.
pub const FILTER_VARIABLE: &str = "SHARDQ_LOG";
const LEVEL_DEFAULT: &str = "info";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Why logging could not be set up (before any subscriber exists, so said on stderr as a
/// plain line by `main`).
#[derive(Debug)]
pub struct LogSetupError(String);

impl fmt::Display for LogSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LogSetupError {}

/// Installs the process's subscriber. `level` is `--log-level`'s value, if given.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), LogSetupError> {
    let filter = filter(level, std::env::var(FILTER_VARIABLE).ok().as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_timer(UtcMicroseconds)
            .try_init(),
        LogFormat::Text if under_journald() => builder
            .event_format(JournaldFormat(
                Format::default().without_time().with_ansi(false),
            ))
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(false)
            .with_timer(UtcMicroseconds)
            .try_init(),
    };
    installed.map_err(|error| LogSetupError(format!("installing the log subscriber: {error}")))
}

/// `--log-level` wins, then `$SHARDQ_LOG`, then `info`.
fn filter(flag: Option<&str>, variable: Option<&str>) -> Result<EnvFilter, LogSetupError> {
    let (directives, source) = match (flag, variable) {
        (Some(level), _) => (level, "--log-level"),
        (None, Some(variable)) if !variable.trim().is_empty() => (variable, FILTER_VARIABLE),
        _ => (LEVEL_DEFAULT, "the default"),
    };
    EnvFilter::builder()
        .parse(directives)
        .map_err(|error| LogSetupError(format!("{source} {directives:?}: {error}")))
}

/// Whether stderr is the journal's stream: `$JOURNAL_STREAM` is `<device>:<inode>` of the
/// stream systemd connected, which still matches stderr's fstat only if nobody
/// redirected it (a shell inside the unit piping stderr elsewhere, say).
fn under_journald() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    let Ok(descriptor) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(metadata) = std::fs::File::from(descriptor).metadata() else {
        return false;
    };
    metadata.dev() == device && metadata.ino() == inode
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// The syslog priority journald reads from a line's `<N>` prefix (sd-daemon(3)).
fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The text format without the time, each line prefixed with its syslog priority.
struct JournaldFormat(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for JournaldFormat
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(context, writer, event)
    }
}

/// RFC 3339 in UTC with microseconds: `2026-01-02T03:04:05.678901Z`.
struct UtcMicroseconds;

impl FormatTime for UtcMicroseconds {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        // A clock before 1970 is a broken host; the epoch is as good a stamp as any.
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        writer.write_str(&rfc3339_microseconds(
            since_epoch.as_secs(),
            since_epoch.subsec_micros(),
        ))
    }
}

fn rfc3339_microseconds(seconds: u64, microseconds: u32) -> String {
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{microseconds:06}Z",
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm, the inverse of the one `parse_time_ms` uses). Worked example: day 0 is
/// shifted to 719,468 days since 0000-03-01, era 4 (years 1600-1999), year of era 369,
/// day of year 306 counted from March: 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(rfc3339_microseconds(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day in a year divisible by 400) 23:59:59.
        assert_eq!(
            rfc3339_microseconds(951_868_799, 999_999),
            "2000-02-29T23:59:59.999999Z"
        );
        assert_eq!(
            rfc3339_microseconds(1_767_323_045, 678_901),
            "2026-01-02T03:04:05.678901Z"
        );
        // Round trip with the parser the CLI's `--from` uses, day by day over 600 years.
        for day in (0..219_000i64).step_by(7) {
            let (year, month, date) = civil_from_days(day);
            let text = format!("{year:04}-{month:02}-{date:02}T00:00:00Z");
            assert_eq!(
                super::super::parse_time_ms(&text),
                Ok(day * 86_400_000),
                "{text}"
            );
        }
    }

    #[test]
    fn the_flag_wins_over_the_variable_which_wins_over_info() {
        assert_eq!(
            filter(Some("warn"), Some("debug")).unwrap().to_string(),
            "warn"
        );
        assert_eq!(filter(None, Some("debug")).unwrap().to_string(), "debug");
        assert_eq!(filter(None, Some(" ")).unwrap().to_string(), "info");
        assert_eq!(filter(None, None).unwrap().to_string(), "info");
        let error = filter(None, Some("shardq=loud")).unwrap_err().to_string();
        assert!(error.starts_with("SHARDQ_LOG \"shardq=loud\""), "{error}");
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:1234"), Some((8, 1234)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
    }
}
