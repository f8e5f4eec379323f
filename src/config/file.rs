//! The broker's configuration as `shardq serve` and `shardq config print` read it: a TOML
//! file, `SHARDQ_<KEY>` environment variables, and `--set key=value` or a dedicated flag,
//! layered over the defaults. Precedence: flag > environment > file > default.
//!
//! Every `ServerConfig` field is a key, named as the field. The topic-level defaults (the
//! `queue_*` keys a topic's own settings override, docs/queues.md §11) sit in a
//! `[topic_defaults]` table; every other key is top-level. `Layered` remembers where each
//! value came from, so that `config print` can show it and a value `validate` refuses can
//! be traced to the file line, variable or flag that set it.
//!
//! Not here: checking values against each other (`ServerConfig::validate`) or against the
//! machine (online CPUs: `server`). Runs once, on the main thread, before any shard.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{CpuList, FailurePolicy, QueueExpiryPolicy, QueueOrdering, ServerConfig};

/// Where `shardq serve` serves metrics and health checks unless told otherwise (the
/// library's default is nowhere: embedders and tests opt in).
pub const SERVE_METRICS_LISTEN_DEFAULT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9749);

/// The table that holds the topic-level defaults.
pub const TOPIC_DEFAULTS_TABLE: &str = "topic_defaults";

/// Environment variables `SHARDQ_<KEY>` set config keys.
pub const ENVIRONMENT_PREFIX: &str = "SHARDQ_";

/// `SHARDQ_*` variables that are not config keys and are left alone: the client
/// commands' broker address, and the debug builds' fault points.
pub const NOT_CONFIG_VARIABLES: &[&str] = &["SHARDQ_SERVER", "SHARDQ_LOG", "SHARDQ_LOG_FORMAT"];
pub const NOT_CONFIG_VARIABLE_PREFIXES: &[&str] = &["SHARDQ_TEST_"];

/// The defaults `shardq serve` starts from: the library's, with the metrics endpoint on.
pub fn serve_defaults() -> ServerConfig {
    ServerConfig {
        metrics_listen: Some(SERVE_METRICS_LISTEN_DEFAULT),
        ..ServerConfig::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// A top-level key.
    Top,
    /// A key of the `[topic_defaults]` table.
    TopicDefaults,
}

/// One config key.
#[derive(Debug)]
pub struct Key {
    /// The `ServerConfig` field it sets.
    pub name: &'static str,
    pub section: Section,
    /// What a value must look like, for error messages.
    pub expected: &'static str,
}

impl Key {
    /// The name `--set` takes: `topic_defaults.<name>` in the table.
    pub fn dotted(&self) -> String {
        match self.section {
            Section::Top => self.name.to_string(),
            Section::TopicDefaults => format!("{TOPIC_DEFAULTS_TABLE}.{}", self.name),
        }
    }

    /// `SHARDQ_<NAME>`: key names are unique over both sections, so the table is not
    /// part of the variable's name.
    pub fn environment_variable(&self) -> String {
        format!("{ENVIRONMENT_PREFIX}{}", self.name.to_ascii_uppercase())
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File {
        path: PathBuf,
        line: usize,
    },
    Environment {
        variable: String,
    },
    /// `--set` or a dedicated flag such as `--cores`.
    Flag {
        flag: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File { path, line } => write!(f, "file {}:{line}", path.display()),
            Source::Environment { variable } => write!(f, "env {variable}"),
            Source::Flag { flag } => write!(f, "flag {flag}"),
        }
    }
}

/// A config the broker cannot read, with where it went wrong.
#[derive(Debug)]
pub enum LoadError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or a table where a value belongs (and the like).
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A key no `ServerConfig` field has, or one in the wrong section.
    UnknownKey {
        /// The file and line, `--set` or the variable that named it.
        place: String,
        key: String,
        hint: Option<String>,
    },
    /// `--set` without `=`.
    SetSyntax { argument: String },
    /// A value of the wrong type or outside its integer range.
    Value {
        key: String,
        value: String,
        expected: String,
        source: Source,
    },
    /// A `SHARDQ_<KEY>` variable whose value is not UTF-8.
    NotUnicode { variable: String },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read { path, source } => {
                write!(f, "reading config file {}: {source}", path.display())
            }
            LoadError::Syntax {
                path,
                line: Some(line),
                message,
            } => write!(f, "config file {}, line {line}: {message}", path.display()),
            LoadError::Syntax {
                path,
                line: None,
                message,
            } => write!(f, "config file {}: {message}", path.display()),
            LoadError::UnknownKey { place, key, hint } => {
                write!(f, "{place}: unknown config key `{key}`")?;
                match hint {
                    Some(hint) => write!(f, " ({hint})"),
                    None => write!(f, " (`shardq config print` lists every key)"),
                }
            }
            LoadError::SetSyntax { argument } => write!(
                f,
                "--set {argument:?}: expected KEY=VALUE (topic_defaults.KEY=VALUE for the [topic_defaults] table)"
            ),
            LoadError::Value {
                key,
                value,
                expected,
                source,
            } => write!(f, "{key} = {value} ({source}): expected {expected}"),
            LoadError::NotUnicode { variable } => {
                write!(f, "environment variable {variable}: the value is not UTF-8")
            }
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A value as it arrives: typed from the file, text from a variable or `--set`.
enum Input<'a> {
    Toml(&'a Value),
    Text(&'a str),
}

impl Input<'_> {
    /// The value as an error message shows it: as TOML would write it.
    fn shown(&self) -> String {
        match self {
            Input::Toml(value) => value.to_string(),
            Input::Text(text) => Value::String(text.to_string()).to_string(),
        }
    }

    /// A string, from the file or as text.
    fn string(&self) -> Option<&str> {
        match self {
            Input::Toml(Value::String(text)) => Some(text),
            Input::Toml(_) => None,
            Input::Text(text) => Some(text.trim()),
        }
    }
}

/// How one key's values are read and written. `decode`'s error says what was expected.
trait Codec {
    type Value;
    const EXPECTED: &'static str;
    fn decode(input: &Input<'_>) -> Result<Self::Value, String>;
    fn encode(value: &Self::Value) -> Value;
}

// TOML integers are signed 64-bit, so the unsigned 64-bit keys stop at i64::MAX from
// every source alike: a value `config print` shows can always be read back.
macro_rules! integer_codec {
    ($codec:ident, $type:ty, $expected:literal) => {
        struct $codec;
        impl Codec for $codec {
            type Value = $type;
            const EXPECTED: &'static str = $expected;
            fn decode(input: &Input<'_>) -> Result<$type, String> {
                let integer = match input {
                    Input::Toml(Value::Integer(integer)) => Some(*integer),
                    Input::Toml(_) => None,
                    // Underscores as TOML allows them: 1_048_576.
                    Input::Text(text) => text.trim().replace('_', "").parse::<i64>().ok(),
                };
                integer
                    .and_then(|integer| <$type>::try_from(integer).ok())
                    .ok_or_else(|| Self::EXPECTED.to_string())
            }
            fn encode(value: &$type) -> Value {
                Value::Integer(
                    i64::try_from(*value).expect("every value comes from decode or a default"),
                )
            }
        }
    };
}

integer_codec!(U16, u16, "an integer from 0 to 65535");
integer_codec!(U32, u32, "an integer from 0 to 4294967295");
integer_codec!(U64, u64, "an integer from 0 to 9223372036854775807");
integer_codec!(Usize, usize, "an integer from 0 to 9223372036854775807");

struct Bool;
impl Codec for Bool {
    type Value = bool;
    const EXPECTED: &'static str = "true or false";
    fn decode(input: &Input<'_>) -> Result<bool, String> {
        match input {
            Input::Toml(Value::Boolean(value)) => Ok(*value),
            Input::Text(text) if text.trim() == "true" => Ok(true),
            Input::Text(text) if text.trim() == "false" => Ok(false),
            _ => Err(Self::EXPECTED.into()),
        }
    }
    fn encode(value: &bool) -> Value {
        Value::Boolean(*value)
    }
}

struct Directory;
impl Codec for Directory {
    type Value = PathBuf;
    const EXPECTED: &'static str = "a path (a non-empty string)";
    fn decode(input: &Input<'_>) -> Result<PathBuf, String> {
        match input.string() {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(Self::EXPECTED.into()),
        }
    }
    fn encode(value: &PathBuf) -> Value {
        // A path that is not UTF-8 can only come from a flag; it is shown, not read back.
        Value::String(value.to_string_lossy().into_owned())
    }
}

struct Address;
impl Codec for Address {
    type Value = SocketAddr;
    const EXPECTED: &'static str = "an address and port, like \"127.0.0.1:9740\"";
    fn decode(input: &Input<'_>) -> Result<SocketAddr, String> {
        input
            .string()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Self::EXPECTED.into())
    }
    fn encode(value: &SocketAddr) -> Value {
        Value::String(value.to_string())
    }
}

struct MetricsAddress;
impl Codec for MetricsAddress {
    type Value = Option<SocketAddr>;
    const EXPECTED: &'static str = "an address and port, like \"127.0.0.1:9749\", or \"off\"";
    fn decode(input: &Input<'_>) -> Result<Option<SocketAddr>, String> {
        match input.string() {
            Some("off") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| Self::EXPECTED.to_string()),
            None => Err(Self::EXPECTED.into()),
        }
    }
    fn encode(value: &Option<SocketAddr>) -> Value {
        Value::String(value.map_or_else(|| "off".to_string(), |address| address.to_string()))
    }
}

/// `"auto"` is `None`: one shard per CPU of `cpus`, else per online CPU. A number out of
/// range (0 included) decodes; `validate` names the range.
struct Cores;
impl Codec for Cores {
    type Value = Option<usize>;
    const EXPECTED: &'static str = "\"auto\" or a number of shards from 1 to 65535";
    fn decode(input: &Input<'_>) -> Result<Option<usize>, String> {
        if input.string() == Some("auto") {
            return Ok(None);
        }
        Usize::decode(input)
            .map(Some)
            .map_err(|_| Self::EXPECTED.to_string())
    }
    fn encode(value: &Option<usize>) -> Value {
        value.map_or_else(
            || Value::String("auto".into()),
            |cores| Usize::encode(&cores),
        )
    }
}

/// `"auto"` is `None`: the lowest-numbered online CPUs.
struct Cpus;
impl Codec for Cpus {
    type Value = Option<CpuList>;
    const EXPECTED: &'static str = "\"auto\" or a CPU list like \"2-7\" or \"0,2,4-6\"";
    fn decode(input: &Input<'_>) -> Result<Option<CpuList>, String> {
        let text = match input {
            // One CPU may be written as a bare number.
            Input::Toml(Value::Integer(cpu)) => cpu.to_string(),
            _ => input.string().ok_or(Self::EXPECTED)?.to_string(),
        };
        if text == "auto" {
            return Ok(None);
        }
        CpuList::parse(&text)
            .map(Some)
            .map_err(|error| format!("{} ({})", Self::EXPECTED, error.reason))
    }
    fn encode(value: &Option<CpuList>) -> Value {
        Value::String(
            value
                .as_ref()
                .map_or_else(|| "auto".into(), CpuList::to_string),
        )
    }
}

/// Enums are lowercase strings, named as the variants.
macro_rules! enum_codec {
    ($codec:ident, $type:ty, $expected:literal, $( $name:literal => $variant:expr ),+ $(,)?) => {
        struct $codec;
        impl Codec for $codec {
            type Value = $type;
            const EXPECTED: &'static str = $expected;
            fn decode(input: &Input<'_>) -> Result<$type, String> {
                match input.string() {
                    $( Some($name) => Ok($variant), )+
                    _ => Err(Self::EXPECTED.into()),
                }
            }
            fn encode(value: &$type) -> Value {
                $( if *value == $variant { return Value::String($name.into()); } )+
                unreachable!("every variant has a name")
            }
        }
    };
}

enum_codec!(
    FailurePolicyCodec,
    FailurePolicy,
    "\"exit_process\" or \"stop_partition\"",
    "exit_process" => FailurePolicy::ExitProcess,
    "stop_partition" => FailurePolicy::StopPartition,
);
enum_codec!(
    ExpiryPolicyCodec,
    QueueExpiryPolicy,
    "\"drop\" or \"dead_letter\"",
    "drop" => QueueExpiryPolicy::Drop,
    "dead_letter" => QueueExpiryPolicy::DeadLetter,
);
enum_codec!(
    OrderingCodec,
    QueueOrdering,
    "\"unordered\" or \"per_key\"",
    "unordered" => QueueOrdering::Unordered,
    "per_key" => QueueOrdering::PerKey,
);

/// The one list of keys: the file's shape, `KEYS`, reading and writing each field. A
/// `ServerConfig` field missing here fails to compile (`every_field_is_a_key`).
macro_rules! config_keys {
    (
        top { $( $top:ident: $top_codec:ty, )* }
        topic_defaults { $( $topic:ident: $topic_codec:ty, )* }
    ) => {
        /// The file as serde reads it: every key optional, unknown keys refused, each
        /// value kept with its place for error messages.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileTop {
            $( $top: Option<Spanned<Value>>, )*
            topic_defaults: Option<FileTopicDefaults>,
        }

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileTopicDefaults {
            $( $topic: Option<Spanned<Value>>, )*
        }

        impl FileTop {
            /// The keys the file sets, in the order of `KEYS`.
            fn into_values(self) -> Vec<(&'static str, Spanned<Value>)> {
                let mut values = Vec::new();
                $( if let Some(value) = self.$top { values.push((stringify!($top), value)); } )*
                if let Some(table) = self.topic_defaults {
                    $( if let Some(value) = table.$topic { values.push((stringify!($topic), value)); } )*
                }
                values
            }
        }

        /// Every key, top-level ones first, in `ServerConfig`'s order.
        pub static KEYS: &[Key] = &[
            $( Key { name: stringify!($top), section: Section::Top, expected: <$top_codec as Codec>::EXPECTED }, )*
            $( Key { name: stringify!($topic), section: Section::TopicDefaults, expected: <$topic_codec as Codec>::EXPECTED }, )*
        ];

        fn set_value(config: &mut ServerConfig, name: &str, input: &Input<'_>) -> Result<(), String> {
            match name {
                $( stringify!($top) => config.$top = <$top_codec as Codec>::decode(input)?, )*
                $( stringify!($topic) => config.$topic = <$topic_codec as Codec>::decode(input)?, )*
                _ => unreachable!("{name} is not in KEYS"),
            }
            Ok(())
        }

        fn get_value(config: &ServerConfig, name: &str) -> Value {
            match name {
                $( stringify!($top) => <$top_codec as Codec>::encode(&config.$top), )*
                $( stringify!($topic) => <$topic_codec as Codec>::encode(&config.$topic), )*
                _ => unreachable!("{name} is not in KEYS"),
            }
        }

        #[allow(dead_code)]
        fn every_field_is_a_key(config: ServerConfig) {
            // Exhaustive: a field added to ServerConfig without a key stops the build.
            let ServerConfig { $( $top: _, )* $( $topic: _, )* } = config;
        }
    };
}

config_keys! {
    top {
        data_dir: Directory,
        listen: Address,
        listen_backlog: U32,
        cores: Cores,
        cpus: Cpus,
        frame_body_bytes_max: U32,
        batch_records_max: U32,
        topics_per_request_max: U32,
        partitions_per_request_max: U32,
        partitions_per_topic_max: U32,
        topics_max: U32,
        stream_groups_per_partition_max: U32,
        connections_per_shard_max: U32,
        connections_max: U32,
        connection_requests_in_flight_max: U32,
        connection_bytes_in_flight_max: U64,
        shard_bytes_in_flight_max: U64,
        connection_idle_timeout_ms: U32,
        frame_read_timeout_ms: U32,
        response_write_timeout_ms: U32,
        connection_linger_ms: U32,
        list_offsets_scan_bytes_max: U64,
        read_buffers_pooled_per_shard_max: U32,
        segment_size_bytes: U64,
        segment_preallocate_step_bytes: U64,
        segment_zero_fill_lookahead_bytes: U64,
        segment_zero_fill_chunk_bytes: U64,
        segment_zero_fill_bytes_per_second_per_shard: U64,
        segment_dsync_write_bytes_max: U64,
        chunk_size_bytes: Usize,
        chunk_memory_bytes_per_shard_max: Usize,
        fetch_wait_ms_max: U32,
        fetch_bytes_max: U32,
        index_interval_bytes: U32,
        mesh_channel_capacity: Usize,
        storage_full_retry_ms: U32,
        storage_failure_policy: FailurePolicyCodec,
        retention_check_interval_ms: U32,
        shutdown_drain_ms: U32,
        shutdown_timeout_ms: U32,
        recycle_segments: Bool,
        timestamp_future_ms_max: U64,
        bind_retry_ms: U32,
        spin_before_park_us: U32,
        tail_cache_bytes_per_shard: Usize,
        producers_per_partition_max: Usize,
        producer_snapshot_interval_bytes: U64,
        queue_window_messages_max: U32,
        queue_in_flight_messages_max: U32,
        queue_receive_messages_max: U32,
        queue_receive_bytes_max: U64,
        queue_handles_per_request_max: U32,
        queue_visibility_timeout_ms_max: U64,
        queue_retry_delay_multiplier_percent: U32,
        queue_retry_jitter_percent: U32,
        queue_nack_delay_ms_max: U64,
        queue_delivery_delay_ms_max: U64,
        queue_nack_reason_bytes_max: U16,
        queue_journal_records_per_snapshot_max: U64,
        queue_groups_per_shard_max: U32,
        metrics_listen: MetricsAddress,
        metrics_shard_answer_timeout_ms: U32,
        log_lines_per_window_max: U32,
        log_window_ms: U32,
    }
    topic_defaults {
        queue_visibility_timeout_ms_default: U64,
        queue_deliveries_max: U32,
        queue_retry_delay_ms_min: U64,
        queue_retry_delay_ms_max: U64,
        queue_message_ttl_ms: U64,
        queue_expiry_policy: ExpiryPolicyCodec,
        queue_ordering: OrderingCodec,
    }
}

/// The key called `name` in `section`, or a hint when it lives in the other one.
fn find_key(name: &str, section: Section) -> Result<&'static Key, Option<String>> {
    if let Some(key) = KEYS
        .iter()
        .find(|key| key.name == name && key.section == section)
    {
        return Ok(key);
    }
    let elsewhere = KEYS.iter().find(|key| key.name == name);
    Err(elsewhere.map(|key| match key.section {
        Section::TopicDefaults => format!(
            "it belongs in the [{TOPIC_DEFAULTS_TABLE}] table: {}",
            key.dotted()
        ),
        Section::Top => format!("it is a top-level key, not one of [{TOPIC_DEFAULTS_TABLE}]"),
    }))
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|byte| **byte == b'\n')
        .count()
        + 1
}

/// A config being built, layer by layer, with each key's source.
#[derive(Debug, Clone)]
pub struct Layered {
    pub config: ServerConfig,
    /// By index in `KEYS`.
    sources: Vec<Source>,
}

impl Layered {
    pub fn new(defaults: ServerConfig) -> Layered {
        Layered {
            config: defaults,
            sources: vec![Source::Default; KEYS.len()],
        }
    }

    fn index(name: &str) -> usize {
        KEYS.iter()
            .position(|key| key.name == name)
            .unwrap_or_else(|| panic!("{name} is not a config key"))
    }

    /// Where the value of `name` came from.
    pub fn source(&self, name: &str) -> &Source {
        &self.sources[Self::index(name)]
    }

    /// Every key with its value, as the file writes it, and its source.
    pub fn entries(&self) -> impl Iterator<Item = (&'static Key, Value, &Source)> + '_ {
        KEYS.iter()
            .zip(&self.sources)
            .map(|(key, source)| (key, get_value(&self.config, key.name), source))
    }

    fn set(
        &mut self,
        key: &'static Key,
        input: &Input<'_>,
        source: Source,
    ) -> Result<(), LoadError> {
        match set_value(&mut self.config, key.name, input) {
            Ok(()) => {
                self.sources[Self::index(key.name)] = source;
                Ok(())
            }
            Err(expected) => Err(LoadError::Value {
                key: key.dotted(),
                value: input.shown(),
                expected,
                source,
            }),
        }
    }

    /// Reads the config file at `path` over what is set so far.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.apply_file_text(path, &text)
    }

    /// `apply_file` on text already read (`path` names it in errors and sources).
    pub fn apply_file_text(&mut self, path: &Path, text: &str) -> Result<(), LoadError> {
        let file: FileTop = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| line_of(text, span.start));
            let message = error.message().trim().to_string();
            // serde's "unknown field `x`, expected one of …" lists all 60 keys: name
            // the one at fault instead, and the section it belongs in if it has one.
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let key = rest.split('`').next().unwrap_or_default().to_string();
                let in_table = text
                    .get(..error.span().map_or(0, |span| span.start))
                    .is_some_and(|before| before.contains(&format!("[{TOPIC_DEFAULTS_TABLE}]")));
                let section = if in_table {
                    Section::TopicDefaults
                } else {
                    Section::Top
                };
                let hint = find_key(&key, section).err().flatten();
                return LoadError::UnknownKey {
                    place: match line {
                        Some(line) => format!("config file {}, line {line}", path.display()),
                        None => format!("config file {}", path.display()),
                    },
                    key,
                    hint,
                };
            }
            LoadError::Syntax {
                path: path.to_path_buf(),
                line,
                message,
            }
        })?;
        for (name, value) in file.into_values() {
            let key = &KEYS[Self::index(name)];
            let source = Source::File {
                path: path.to_path_buf(),
                line: line_of(text, value.span().start),
            };
            self.set(key, &Input::Toml(value.get_ref()), source)?;
        }
        Ok(())
    }

    /// Applies every `SHARDQ_<KEY>` variable of `variables` (the process's, from
    /// `std::env::vars_os`). Returns one warning per `SHARDQ_*` variable that is no key
    /// and not one of `NOT_CONFIG_VARIABLES`: a misspelt key should not pass silently,
    /// and it should not stop a broker either (another tool's variable may share the
    /// prefix).
    pub fn apply_environment(
        &mut self,
        variables: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Vec<String>, LoadError> {
        let mut variables: Vec<(String, OsString)> = variables
            .into_iter()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
            .filter(|(name, _)| {
                name.starts_with(ENVIRONMENT_PREFIX)
                    && !NOT_CONFIG_VARIABLES.contains(&name.as_str())
                    && !NOT_CONFIG_VARIABLE_PREFIXES
                        .iter()
                        .any(|prefix| name.starts_with(prefix))
            })
            .collect();
        // Deterministic: the first error is the same on every run.
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut warnings = Vec::new();
        for (variable, value) in variables {
            let Some(key) = KEYS
                .iter()
                .find(|key| key.environment_variable() == variable)
            else {
                warnings.push(format!(
                    "environment variable {variable} is not a config key; ignored (`shardq config print` lists every key)"
                ));
                continue;
            };
            let value = value.into_string().map_err(|_| LoadError::NotUnicode {
                variable: variable.clone(),
            })?;
            self.set(key, &Input::Text(&value), Source::Environment { variable })?;
        }
        Ok(warnings)
    }

    /// One `--set KEY=VALUE` (`topic_defaults.KEY=VALUE` for the table).
    pub fn apply_set(&mut self, argument: &str) -> Result<(), LoadError> {
        let Some((dotted, value)) = argument.split_once('=') else {
            return Err(LoadError::SetSyntax {
                argument: argument.to_string(),
            });
        };
        let dotted = dotted.trim();
        let (name, section) = match dotted.strip_prefix(TOPIC_DEFAULTS_TABLE) {
            Some(rest) if rest.starts_with('.') => (&rest[1..], Section::TopicDefaults),
            _ => (dotted, Section::Top),
        };
        let key = find_key(name, section).map_err(|hint| LoadError::UnknownKey {
            place: format!("--set {argument:?}"),
            key: dotted.to_string(),
            hint,
        })?;
        self.set(
            key,
            &Input::Text(value),
            Source::Flag {
                flag: "--set".into(),
            },
        )
    }

    /// A dedicated flag (`--cores`, …), already parsed: `apply` sets the field of `name`.
    pub fn apply_flag(&mut self, name: &str, flag: &str, apply: impl FnOnce(&mut ServerConfig)) {
        let index = Self::index(name);
        apply(&mut self.config);
        self.sources[index] = Source::Flag { flag: flag.into() };
    }

    /// The effective config as a config file: every key, its source in a comment.
    pub fn render_toml(&self) -> String {
        let mut out = String::from(
            "# The effective shardq configuration (`shardq config print`): every key, with\n\
             # where its value came from (default, file PATH:LINE, env VARIABLE or flag FLAG).\n\
             # `shardq serve --config` reads this file back.\n\n",
        );
        let mut in_table = false;
        for (key, value, source) in self.entries() {
            if key.section == Section::TopicDefaults && !in_table {
                out.push_str(&format!("\n[{TOPIC_DEFAULTS_TABLE}]\n"));
                in_table = true;
            }
            // A path may hold any character; a comment ends at a line break.
            let source = source.to_string().replace(['\n', '\r'], " ");
            out.push_str(&format!("{} = {value} # {source}\n", key.name));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Layered, LoadError> {
        let mut layered = Layered::new(serve_defaults());
        layered.apply_file_text(Path::new("/etc/shardq/shardq.toml"), text)?;
        Ok(layered)
    }

    #[test]
    fn file_sets_keys_and_the_topic_defaults_table() {
        let layered = file(
            "segment_size_bytes = 8_388_608\ncores = 2\ncpus = \"0,2-3\"\nmetrics_listen = \"off\"\n\
             storage_failure_policy = \"stop_partition\"\n\n[topic_defaults]\nqueue_deliveries_max = 3\nqueue_ordering = \"per_key\"\n",
        )
        .unwrap();
        assert_eq!(layered.config.segment_size_bytes, 8 << 20);
        assert_eq!(layered.config.cores, Some(2));
        assert_eq!(layered.config.cpus.as_ref().unwrap().cpus(), &[0, 2, 3]);
        assert_eq!(layered.config.metrics_listen, None);
        assert_eq!(
            layered.config.storage_failure_policy,
            FailurePolicy::StopPartition
        );
        assert_eq!(layered.config.queue_deliveries_max, 3);
        assert_eq!(layered.config.queue_ordering, QueueOrdering::PerKey);
        assert_eq!(
            layered.source("queue_deliveries_max"),
            &Source::File {
                path: "/etc/shardq/shardq.toml".into(),
                line: 8
            }
        );
        assert_eq!(layered.source("listen"), &Source::Default);
    }

    #[test]
    fn file_sets_the_zero_fill_and_dsync_keys() {
        let layered = file(
            "segment_zero_fill_lookahead_bytes = 8_388_608
segment_zero_fill_chunk_bytes = 131072
segment_zero_fill_bytes_per_second_per_shard = 0
segment_dsync_write_bytes_max = 0
",
        )
        .unwrap();
        assert_eq!(layered.config.segment_dsync_write_bytes_max, 0);
        assert_eq!(layered.config.segment_zero_fill_lookahead_bytes, 8 << 20);
        assert_eq!(layered.config.segment_zero_fill_chunk_bytes, 128 << 10);
        assert_eq!(
            layered.config.segment_zero_fill_bytes_per_second_per_shard,
            0
        );
        let defaults = file("").unwrap().config;
        assert_eq!(defaults.segment_dsync_write_bytes_max, 1 << 20);
        assert_eq!(defaults.segment_zero_fill_lookahead_bytes, 4 << 20);
        assert_eq!(defaults.segment_zero_fill_chunk_bytes, 64 << 10);
        assert_eq!(
            defaults.segment_zero_fill_bytes_per_second_per_shard,
            32 << 20
        );
    }

    #[test]
    fn unknown_key_names_the_key_the_file_and_the_line() {
        let error = file("listen = \"127.0.0.1:1\"\nsegment_size = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`segment_size`")
                && error.contains("/etc/shardq/shardq.toml")
                && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn key_in_the_wrong_section_says_where_it_belongs() {
        let error = file("queue_deliveries_max = 3\n").unwrap_err().to_string();
        assert!(
            error.contains("queue_deliveries_max") && error.contains("[topic_defaults]"),
            "{error}"
        );
        let error = file("[topic_defaults]\nsegment_size_bytes = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("segment_size_bytes") && error.contains("top-level"),
            "{error}"
        );
    }

    #[test]
    fn wrong_type_or_range_names_key_value_and_expected() {
        for (text, key, value, expected) in [
            (
                "segment_size_bytes = \"big\"",
                "segment_size_bytes",
                "\"big\"",
                "an integer from 0 to 9223372036854775807",
            ),
            (
                "connections_max = 4294967296",
                "connections_max",
                "4294967296",
                "an integer from 0 to 4294967295",
            ),
            (
                "connections_max = -1",
                "connections_max",
                "-1",
                "an integer from 0 to 4294967295",
            ),
            (
                "recycle_segments = 1",
                "recycle_segments",
                "1",
                "true or false",
            ),
            (
                "listen = \"localhost\"",
                "listen",
                "\"localhost\"",
                "an address",
            ),
            (
                "[topic_defaults]\nqueue_expiry_policy = \"Drop\"",
                "topic_defaults.queue_expiry_policy",
                "\"Drop\"",
                "\"drop\" or \"dead_letter\"",
            ),
            ("cpus = \"3-1\"", "cpus", "\"3-1\"", "runs backwards"),
        ] {
            let error = file(text).unwrap_err().to_string();
            assert!(
                error.contains(&format!("{key} = {value}")) && error.contains(expected),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn not_toml_names_the_line() {
        let error = file("cores = 1\nlisten = \n").unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn environment_sets_keys_and_warns_on_unknown_shardq_variables() {
        let mut layered = Layered::new(serve_defaults());
        let warnings = layered
            .apply_environment([
                ("SHARDQ_SEGMENT_SIZE_BYTES".into(), "1_048_576".into()),
                ("SHARDQ_QUEUE_ORDERING".into(), "per_key".into()),
                ("SHARDQ_SERVER".into(), "h:1".into()),
                ("SHARDQ_TEST_SEED".into(), "7".into()),
                ("SHARDQ_SEGMENT_SIZE".into(), "1".into()),
                ("PATH".into(), "/bin".into()),
            ])
            .unwrap();
        assert_eq!(layered.config.segment_size_bytes, 1 << 20);
        assert_eq!(layered.config.queue_ordering, QueueOrdering::PerKey);
        assert_eq!(
            layered.source("segment_size_bytes"),
            &Source::Environment {
                variable: "SHARDQ_SEGMENT_SIZE_BYTES".into()
            }
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("SHARDQ_SEGMENT_SIZE "), "{warnings:?}");
        let error = layered
            .apply_environment([("SHARDQ_CORES".into(), "many".into())])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cores = \"many\"") && error.contains("env SHARDQ_CORES"),
            "{error}"
        );
    }

    #[test]
    fn set_takes_dotted_table_keys_and_refuses_the_wrong_section() {
        let mut layered = Layered::new(serve_defaults());
        layered.apply_set("cores=3").unwrap();
        layered
            .apply_set("topic_defaults.queue_message_ttl_ms=60000")
            .unwrap();
        layered.apply_set("metrics_listen=off").unwrap();
        assert_eq!(layered.config.cores, Some(3));
        assert_eq!(layered.config.queue_message_ttl_ms, 60_000);
        assert_eq!(layered.config.metrics_listen, None);
        let error = layered
            .apply_set("queue_message_ttl_ms=1")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("topic_defaults.queue_message_ttl_ms"),
            "{error}"
        );
        let error = layered.apply_set("cores").unwrap_err().to_string();
        assert!(error.contains("KEY=VALUE"), "{error}");
        let error = layered.apply_set("nonsense=1").unwrap_err().to_string();
        assert!(error.contains("`nonsense`"), "{error}");
    }

    #[test]
    fn rendered_config_reads_back_to_the_same_values() {
        let mut layered = Layered::new(serve_defaults());
        layered.apply_set("cpus=0,2,4-6").unwrap();
        layered.apply_set("cores=5").unwrap();
        layered.apply_set("data_dir=/var/lib/shard \"q\"").unwrap();
        layered
            .apply_set("topic_defaults.queue_expiry_policy=dead_letter")
            .unwrap();
        let text = layered.render_toml();
        let again = file(&text).unwrap();
        for ((key, value, _), (_, read_back, source)) in layered.entries().zip(again.entries()) {
            assert_eq!(value, read_back, "{}", key.name);
            assert!(matches!(source, Source::File { .. }), "{}", key.name);
        }
        assert!(text.contains("cpus = \"0,2,4-6\" # flag --set"), "{text}");
    }
}
