//! Where `serve` gets its configuration, and `shardq config print`: the defaults, then
//! `--config FILE`, then `SHARDQ_<KEY>` variables, then `--set` and the dedicated flags
//! (shardq::config::file has the layers and the keys). Runs before any shard starts:
//! a config that does not load or validate starts nothing.

use std::fmt;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use shardq::config::file::{serve_defaults, Layered, LoadError, Section, Source};
use shardq::config::{ConfigError, CpuList};

use super::{CliError, MetricsListen, ServeArgs};

/// The file and the `--set` overrides, shared by `serve` and `config print`.
#[derive(Debug, Args)]
pub struct ConfigSourceArgs {
    /// TOML config file: every key, with its default, is in tuning/shardq.toml.
    /// SHARDQ_<KEY> variables, --set and the flags below override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Sets one config key over the file and the environment (repeatable):
    /// KEY=VALUE, or topic_defaults.KEY=VALUE for the [topic_defaults] table.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show the effective configuration (every key, with where its value came from:
    /// default, file, env or flag) as a config file `--config` reads back.
    Print(ConfigPrintArgs),
}

#[derive(Debug, Args)]
pub struct ConfigPrintArgs {
    #[command(flatten)]
    pub source: ConfigSourceArgs,
    /// JSON instead: {"key": {"value": …, "source": "…"}, "topic_defaults": {…}}.
    #[arg(long)]
    pub json: bool,
}

/// A config that does not load, or a value `validate` refuses (with where it was set).
#[derive(Debug)]
pub enum ConfigCliError {
    Load(LoadError),
    Invalid { error: ConfigError, source: Source },
}

impl fmt::Display for ConfigCliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigCliError::Load(error) => write!(f, "{error}"),
            ConfigCliError::Invalid { error, source } => write!(f, "{error} ({source})"),
        }
    }
}

impl std::error::Error for ConfigCliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigCliError::Load(error) => Some(error),
            ConfigCliError::Invalid { error, .. } => Some(error),
        }
    }
}

/// Defaults, file, environment, `--set`, in that order (later wins). Warnings about
/// `SHARDQ_*` variables that are no key go to stderr.
fn layered(source: &ConfigSourceArgs) -> Result<Layered, ConfigCliError> {
    let mut layered = Layered::new(serve_defaults());
    if let Some(path) = &source.config {
        layered.apply_file(path).map_err(ConfigCliError::Load)?;
    }
    let warnings = layered
        .apply_environment(std::env::vars_os())
        .map_err(ConfigCliError::Load)?;
    for warning in warnings {
        // `serve` has its log output set up by now: the warning goes where its other
        // lines go (JSON, journald); `config print` and `doctor` print it plainly.
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{warning}");
        } else {
            eprintln!("shardq: warning: {warning}");
        }
    }
    for argument in &source.set {
        layered.apply_set(argument).map_err(ConfigCliError::Load)?;
    }
    Ok(layered)
}

/// `validate`, with the source of the key it refuses.
fn validated(layered: &Layered) -> Result<(), ConfigCliError> {
    layered
        .config
        .validate()
        .map_err(|error| ConfigCliError::Invalid {
            source: layered.source(error.key).clone(),
            error,
        })
}

/// The config `serve` runs with: the layers, then the dedicated flags (which win over
/// `--set` for the same key), validated.
pub fn serve_config(args: ServeArgs) -> Result<shardq::config::ServerConfig, CliError> {
    let layered = serve_layers(args)?;
    validated(&layered).map_err(CliError::Config)?;
    log_differences_from_defaults(&layered);
    Ok(layered.config)
}

/// One start-up line with every setting whose value is not `serve`'s default, and where
/// it came from: what an operator changed, without the 60 keys that they did not.
fn log_differences_from_defaults(layered: &Layered) {
    let defaults = Layered::new(serve_defaults());
    let changed: Vec<String> = layered
        .entries()
        .zip(defaults.entries())
        .filter(|((_, value, _), (_, default, _))| value != default)
        .map(|((key, value, source), _)| format!("{} = {value} ({source})", key.dotted()))
        .collect();
    if changed.is_empty() {
        tracing::info!(changed = 0, "settings: every key at its default");
    } else {
        tracing::info!(
            changed = changed.len(),
            "settings that differ from the defaults: {}",
            changed.join(", ")
        );
    }
}

/// What `serve` would run with, not yet validated: `doctor` reports a setting `serve`
/// would refuse as one of its checks rather than stopping at it.
pub fn unvalidated_serve_config(args: ServeArgs) -> Result<shardq::config::ServerConfig, CliError> {
    Ok(serve_layers(args)?.config)
}

fn serve_layers(args: ServeArgs) -> Result<Layered, CliError> {
    let mut layered = layered(&args.source).map_err(CliError::Config)?;
    if let Some(data_dir) = args.data_dir {
        layered.apply_flag("data_dir", "--data-dir", |config| {
            config.data_dir = data_dir
        });
    }
    if let Some(listen) = args.listen {
        layered.apply_flag("listen", "--listen", |config| config.listen = listen);
    }
    if let Some(cores) = args.cores {
        layered.apply_flag("cores", "--cores", |config| config.cores = Some(cores));
    }
    if let Some(cpus) = args.cpus {
        layered.apply_flag("cpus", "--cpus", |config| config.cpus = Some(cpus));
    }
    if let Some(bind_retry_ms) = args.bind_retry_ms {
        layered.apply_flag("bind_retry_ms", "--bind-retry-ms", |config| {
            config.bind_retry_ms = bind_retry_ms
        });
    }
    if let Some(connections_max) = args.connections_max {
        layered.apply_flag("connections_max", "--connections-max", |config| {
            config.connections_max = connections_max
        });
    }
    if let Some(bytes) = args.shard_bytes_in_flight_max {
        layered.apply_flag(
            "shard_bytes_in_flight_max",
            "--shard-bytes-in-flight-max",
            |config| config.shard_bytes_in_flight_max = bytes,
        );
    }
    if let Some(timeout) = args.connection_idle_timeout_ms {
        layered.apply_flag(
            "connection_idle_timeout_ms",
            "--connection-idle-timeout-ms",
            |config| config.connection_idle_timeout_ms = timeout,
        );
    }
    if let Some(timeout) = args.response_write_timeout_ms {
        layered.apply_flag(
            "response_write_timeout_ms",
            "--response-write-timeout-ms",
            |config| config.response_write_timeout_ms = timeout,
        );
    }
    if let Some(MetricsListen(address)) = args.metrics_listen {
        layered.apply_flag("metrics_listen", "--metrics-listen", |config| {
            config.metrics_listen = address
        });
    }
    Ok(layered)
}

/// `--cpus LIST`.
pub fn parse_cpus(value: &str) -> Result<CpuList, String> {
    CpuList::parse(value).map_err(|error| error.to_string())
}

pub fn config(command: ConfigCommand) -> Result<(), CliError> {
    match command {
        ConfigCommand::Print(args) => {
            let layered = layered(&args.source).map_err(CliError::Config)?;
            if args.json {
                println!("{:#}", json_of(&layered));
            } else {
                print!("{}", layered.render_toml());
            }
            // Printed first: an operator sees the whole picture along with what is wrong.
            validated(&layered).map_err(CliError::Config)
        }
    }
}

fn json_of(layered: &Layered) -> Value {
    let mut top = Map::new();
    let mut table = Map::new();
    for (key, value, source) in layered.entries() {
        let entry = json!({
            "value": serde_json::to_value(&value).expect("a TOML value is JSON"),
            "source": source.to_string(),
        });
        match key.section {
            Section::Top => top.insert(key.name.to_string(), entry),
            Section::TopicDefaults => table.insert(key.name.to_string(), entry),
        };
    }
    top.insert(
        shardq::config::file::TOPIC_DEFAULTS_TABLE.to_string(),
        Value::Object(table),
    );
    Value::Object(top)
}
