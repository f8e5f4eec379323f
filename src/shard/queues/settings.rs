//! A topic's queue settings: how they are checked, resolved against the broker's
//! defaults, and kept in the topic's `topic.meta` file. Pure functions: no I/O here.
//!
//! A topic stores only the settings it was given (`None`: the broker's `queue_*` key
//! decides, so changing a broker default reaches every topic that did not set its own).
//! `topic.meta` holds them as extra `key=value` lines; a file without them (written
//! before queue groups existed) loads as "broker defaults everywhere".

use crate::config::ServerConfig;
use crate::delivery::{self, QueueGroupConfig};
use crate::placement::fnv1a64;
use crate::protocol::queue::{ExpiryPolicy, QueueOrdering, QueueSettings, GROUP_NAME_BYTES_MAX};
use crate::protocol::{quote_untrusted, validate_topic_name, ErrorCode, WireError};

/// Suffix of the dead-letter topic the broker names when a topic names none.
pub const DLQ_SUFFIX: &str = ".dlq";

/// `topic.meta` keys of the queue settings and of placement.
const KEY_DELIVERIES_MAX: &str = "queue_deliveries_max";
const KEY_VISIBILITY_TIMEOUT_MS: &str = "queue_visibility_timeout_ms";
const KEY_RETRY_DELAY_MS_MIN: &str = "queue_retry_delay_ms_min";
const KEY_RETRY_DELAY_MS_MAX: &str = "queue_retry_delay_ms_max";
const KEY_MESSAGE_TTL_MS: &str = "queue_message_ttl_ms";
const KEY_EXPIRY_POLICY: &str = "queue_expiry_policy";
const KEY_ORDERING: &str = "queue_ordering";
const KEY_DLQ_TOPIC: &str = "queue_dlq_topic";
pub const KEY_PLACEMENT: &str = "placement";
pub const KEY_DEAD_LETTER_SOURCE: &str = "dead_letter_source";

/// A consumer group's name is a directory name: the topic-name alphabet, 1 to
/// `GROUP_NAME_BYTES_MAX` bytes, never `.` or `..`.
pub fn validate_group_name(name: &str) -> Result<(), WireError> {
    let valid = !name.is_empty()
        && name.len() <= GROUP_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        && name != "."
        && name != "..";
    if valid {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::InvalidGroupName,
        format!(
            "group name {} ({} bytes) must be 1 to {GROUP_NAME_BYTES_MAX} bytes of letters, digits, '.', '_' or '-'",
            quote_untrusted(name),
            name.len()
        ),
    ))
}

fn invalid(key: &str, value: impl std::fmt::Display, reason: &str) -> WireError {
    WireError::new(
        ErrorCode::InvalidRequest,
        format!("queue setting {key} = {value}: {reason}"),
    )
}

/// Checks a topic's queue settings as they would be resolved against `config`: every
/// refusal names the setting and its value.
pub fn validate(
    topic: &str,
    settings: &QueueSettings,
    config: &ServerConfig,
) -> Result<(), WireError> {
    if settings.deliveries_max == Some(0) {
        return Err(invalid("deliveries_max", 0, "must be at least 1"));
    }
    if let Some(visibility) = settings.visibility_timeout_ms {
        if visibility == 0 || visibility > config.queue_visibility_timeout_ms_max {
            return Err(invalid(
                "visibility_timeout_ms",
                visibility,
                &format!(
                    "must be between 1 and {} (queue_visibility_timeout_ms_max)",
                    config.queue_visibility_timeout_ms_max
                ),
            ));
        }
    }
    if settings.retry_delay_ms_max == Some(0) {
        return Err(invalid("retry_delay_ms_max", 0, "must be at least 1"));
    }
    let minimum = settings
        .retry_delay_ms_min
        .unwrap_or(config.queue_retry_delay_ms_min);
    let maximum = settings
        .retry_delay_ms_max
        .unwrap_or(config.queue_retry_delay_ms_max);
    if minimum > maximum {
        return Err(invalid(
            "retry_delay_ms_min",
            minimum,
            &format!("must not exceed retry_delay_ms_max ({maximum})"),
        ));
    }
    if let Some(dlq) = &settings.dlq_topic {
        validate_topic_name(dlq)
            .map_err(|error| invalid("dlq_topic", quote_untrusted(dlq), &error.message))?;
        if dlq == topic {
            return Err(invalid(
                "dlq_topic",
                quote_untrusted(dlq),
                "a topic cannot be its own dead-letter queue",
            ));
        }
    }
    // What every group of the topic will run with must pass the state machine's checks.
    resolve(config, settings, topic, "", 0)
        .validate()
        .map_err(|error| {
            WireError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "queue settings of topic {}: {error}",
                    quote_untrusted(topic)
                ),
            )
        })
}

/// A topic without a `dlq_topic` of its own dead-letters to `<topic>.dlq`: that name must
/// be a valid topic name too, or its dead letters could never be appended. Checked at
/// create and alter (not for a DLQ the broker created: it has no DLQ).
pub fn validate_dead_letter_name(topic: &str, settings: &QueueSettings) -> Result<(), WireError> {
    if settings.dlq_topic.is_some() {
        return Ok(());
    }
    let dlq = dlq_topic_of(topic, settings);
    validate_topic_name(&dlq).map_err(|error| {
        WireError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "topic {} would dead-letter to {}, which is not a valid topic name ({}); name a shorter topic or set dlq_topic",
                quote_untrusted(topic),
                quote_untrusted(&dlq),
                error.message
            ),
        )
    })
}

/// A stored setting that no longer fits the broker's current limits, and what is used
/// instead (`fit_to_limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clamped {
    pub key: &'static str,
    pub stored: u64,
    pub used: u64,
    /// The limit it was cut to, as the operator knows it.
    pub limit: String,
}

impl std::fmt::Display for Clamped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue setting {} = {} does not fit {}; using {}",
            self.key, self.stored, self.limit, self.used
        )
    }
}

/// A topic's stored settings cut to what the broker's current config allows: the
/// operator may have lowered a limit (`queue_visibility_timeout_ms_max`, the retry
/// delay keys) since the topic was created. The topic keeps working with the limit's
/// value rather than failing to load; each cut is returned to be logged. Stored values
/// that were never valid (0 in a hand-edited `topic.meta`) become the smallest valid one.
pub fn fit_to_limits(
    settings: &QueueSettings,
    config: &ServerConfig,
) -> (QueueSettings, Vec<Clamped>) {
    let mut fitted = settings.clone();
    let mut cuts = Vec::new();
    let mut cut = |key: &'static str, stored: u64, used: u64, limit: String| {
        cuts.push(Clamped {
            key,
            stored,
            used,
            limit,
        });
        used
    };
    if fitted.deliveries_max == Some(0) {
        fitted.deliveries_max = Some(1);
        cut("deliveries_max", 0, 1, "the minimum 1".into());
    }
    if let Some(visibility) = fitted.visibility_timeout_ms {
        let maximum = config.queue_visibility_timeout_ms_max;
        if visibility == 0 {
            fitted.visibility_timeout_ms =
                Some(cut("visibility_timeout_ms", 0, 1, "the minimum 1".into()));
        } else if visibility > maximum {
            fitted.visibility_timeout_ms = Some(cut(
                "visibility_timeout_ms",
                visibility,
                maximum,
                format!("queue_visibility_timeout_ms_max = {maximum}"),
            ));
        }
    }
    if fitted.retry_delay_ms_max == Some(0) {
        fitted.retry_delay_ms_max = Some(cut("retry_delay_ms_max", 0, 1, "the minimum 1".into()));
    }
    let maximum = fitted
        .retry_delay_ms_max
        .unwrap_or(config.queue_retry_delay_ms_max);
    let minimum = fitted
        .retry_delay_ms_min
        .unwrap_or(config.queue_retry_delay_ms_min);
    if minimum > maximum {
        let limit = match fitted.retry_delay_ms_max {
            Some(_) => format!("the topic's retry_delay_ms_max = {maximum}"),
            None => format!("queue_retry_delay_ms_max = {maximum}"),
        };
        fitted.retry_delay_ms_min = Some(cut("retry_delay_ms_min", minimum, maximum, limit));
    }
    (fitted, cuts)
}

/// `settings` with `changes` applied: a `Some` in `changes` replaces, a `None` keeps.
pub fn merge(settings: &QueueSettings, changes: &QueueSettings) -> QueueSettings {
    QueueSettings {
        deliveries_max: changes.deliveries_max.or(settings.deliveries_max),
        visibility_timeout_ms: changes
            .visibility_timeout_ms
            .or(settings.visibility_timeout_ms),
        retry_delay_ms_min: changes.retry_delay_ms_min.or(settings.retry_delay_ms_min),
        retry_delay_ms_max: changes.retry_delay_ms_max.or(settings.retry_delay_ms_max),
        message_ttl_ms: changes.message_ttl_ms.or(settings.message_ttl_ms),
        expiry_policy: changes.expiry_policy.or(settings.expiry_policy),
        ordering: changes.ordering.or(settings.ordering),
        dlq_topic: changes
            .dlq_topic
            .clone()
            .or_else(|| settings.dlq_topic.clone()),
    }
}

/// The config one (partition, group) of `topic` runs with: the broker's `queue_*` keys,
/// overridden by what the topic sets.
pub fn resolve(
    config: &ServerConfig,
    settings: &QueueSettings,
    topic: &str,
    group: &str,
    partition: u32,
) -> QueueGroupConfig {
    // Loaded topics were fitted (and the cuts logged) already; fitting again here keeps
    // every resolved config valid whatever path the settings came by.
    let (settings, _) = fit_to_limits(settings, config);
    let settings = &settings;
    let mut resolved = config.queue_group_defaults(partition);
    if let Some(deliveries_max) = settings.deliveries_max {
        resolved.deliveries_max = deliveries_max;
    }
    if let Some(visibility) = settings.visibility_timeout_ms {
        resolved.visibility_timeout_ms_default = visibility;
    }
    if let Some(minimum) = settings.retry_delay_ms_min {
        resolved.retry.delay_ms_min = minimum;
    }
    if let Some(maximum) = settings.retry_delay_ms_max {
        resolved.retry.delay_ms_max = maximum;
    }
    if let Some(ttl) = settings.message_ttl_ms {
        resolved.message_ttl_ms = ttl;
    }
    if let Some(policy) = settings.expiry_policy {
        resolved.expiry_policy = match policy {
            ExpiryPolicy::Drop => delivery::ExpiryPolicy::Drop,
            ExpiryPolicy::DeadLetter => delivery::ExpiryPolicy::DeadLetter,
        };
    }
    if let Some(ordering) = settings.ordering {
        resolved.ordering = match ordering {
            QueueOrdering::Unordered => delivery::Ordering::Unordered,
            QueueOrdering::PerKey => delivery::Ordering::PerKey,
        };
    }
    // Jitter differs per group and topic, the same across restarts.
    resolved.random_seed = fnv1a64(format!("{topic}/{group}").as_bytes());
    resolved
}

/// Every setting filled in: what Metadata answers. A dead-letter topic the broker created
/// has no DLQ of its own (`dlq_topic` None).
pub fn filled(
    config: &ServerConfig,
    settings: &QueueSettings,
    topic: &str,
    is_dead_letter_queue: bool,
) -> QueueSettings {
    let resolved = resolve(config, settings, topic, "", 0);
    QueueSettings {
        deliveries_max: Some(resolved.deliveries_max),
        visibility_timeout_ms: Some(resolved.visibility_timeout_ms_default),
        retry_delay_ms_min: Some(resolved.retry.delay_ms_min),
        retry_delay_ms_max: Some(resolved.retry.delay_ms_max),
        message_ttl_ms: Some(resolved.message_ttl_ms),
        expiry_policy: Some(match resolved.expiry_policy {
            delivery::ExpiryPolicy::Drop => ExpiryPolicy::Drop,
            delivery::ExpiryPolicy::DeadLetter => ExpiryPolicy::DeadLetter,
        }),
        ordering: Some(match resolved.ordering {
            delivery::Ordering::Unordered => QueueOrdering::Unordered,
            delivery::Ordering::PerKey => QueueOrdering::PerKey,
        }),
        dlq_topic: if is_dead_letter_queue {
            None
        } else {
            Some(dlq_topic_of(topic, settings))
        },
    }
}

/// The dead-letter topic of `topic`: its own setting, else `<topic>.dlq`.
pub fn dlq_topic_of(topic: &str, settings: &QueueSettings) -> String {
    settings
        .dlq_topic
        .clone()
        .unwrap_or_else(|| format!("{topic}{DLQ_SUFFIX}"))
}

/// A group's own settings (`AlterGroup`, docs/queues.md §3): only the retry delays may
/// be set per group; every other setting is the topic's. A refusal names the setting and
/// its value. A change that sets nothing is refused too: it would do nothing.
pub fn check_group_settings(settings: &QueueSettings) -> Result<(), WireError> {
    let not_per_group = |key: &str, value: String| {
        Err(invalid(
            key,
            value,
            "a group may set only retry_delay_ms_min and retry_delay_ms_max; set it on the topic",
        ))
    };
    if let Some(value) = settings.deliveries_max {
        return not_per_group("deliveries_max", value.to_string());
    }
    if let Some(value) = settings.visibility_timeout_ms {
        return not_per_group("visibility_timeout_ms", value.to_string());
    }
    if let Some(value) = settings.message_ttl_ms {
        return not_per_group("message_ttl_ms", value.to_string());
    }
    if let Some(value) = settings.expiry_policy {
        return not_per_group("expiry_policy", value.name().to_owned());
    }
    if let Some(value) = settings.ordering {
        return not_per_group("ordering", value.name().to_owned());
    }
    if let Some(value) = &settings.dlq_topic {
        return not_per_group("dlq_topic", quote_untrusted(value));
    }
    if settings.retry_delay_ms_min.is_none() && settings.retry_delay_ms_max.is_none() {
        return Err(WireError::new(
            ErrorCode::InvalidRequest,
            "AlterGroup sets no setting: give retry_delay_ms_min, retry_delay_ms_max or both",
        ));
    }
    Ok(())
}

/// What one group of a topic runs with: the topic's settings, with the group's own
/// (its retry delays) winning. A later change of the topic's retry delays leaves a
/// group's own in place.
pub fn group_settings(topic: &QueueSettings, group: &QueueSettings) -> QueueSettings {
    merge(topic, group)
}

/// The text of a group's `settings` file: the `topic.meta` lines of what it set.
pub fn group_file_text(settings: &QueueSettings) -> String {
    let mut text = String::new();
    for line in meta_lines(settings) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Reads a group's `settings` file back. A line with an unknown key, a setting a group
/// cannot set, or an unreadable value is an error naming it.
pub fn from_group_file(text: &str) -> Result<QueueSettings, String> {
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let Some((key, _)) = line.split_once('=') else {
            return Err(format!("line {line:?} is not key=value"));
        };
        if key != KEY_RETRY_DELAY_MS_MIN && key != KEY_RETRY_DELAY_MS_MAX {
            return Err(format!(
                "key {key:?} is not a group setting ({KEY_RETRY_DELAY_MS_MIN} or {KEY_RETRY_DELAY_MS_MAX})"
            ));
        }
    }
    from_meta(|key| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    })
}

/// The `key=value` lines of the settings a topic set (none for broker defaults).
pub fn meta_lines(settings: &QueueSettings) -> Vec<String> {
    let mut lines = Vec::new();
    let mut number = |key: &str, value: Option<u64>| {
        if let Some(value) = value {
            lines.push(format!("{key}={value}"));
        }
    };
    number(KEY_DELIVERIES_MAX, settings.deliveries_max.map(u64::from));
    number(KEY_VISIBILITY_TIMEOUT_MS, settings.visibility_timeout_ms);
    number(KEY_RETRY_DELAY_MS_MIN, settings.retry_delay_ms_min);
    number(KEY_RETRY_DELAY_MS_MAX, settings.retry_delay_ms_max);
    number(KEY_MESSAGE_TTL_MS, settings.message_ttl_ms);
    if let Some(policy) = settings.expiry_policy {
        lines.push(format!(
            "{KEY_EXPIRY_POLICY}={}",
            match policy {
                ExpiryPolicy::Drop => "drop",
                ExpiryPolicy::DeadLetter => "dead_letter",
            }
        ));
    }
    if let Some(ordering) = settings.ordering {
        lines.push(format!(
            "{KEY_ORDERING}={}",
            match ordering {
                QueueOrdering::Unordered => "unordered",
                QueueOrdering::PerKey => "per_key",
            }
        ));
    }
    if let Some(dlq) = &settings.dlq_topic {
        lines.push(format!("{KEY_DLQ_TOPIC}={dlq}"));
    }
    lines
}

/// Reads the settings back from a `topic.meta` file's text; `field(key)` finds a line's
/// value. An unreadable value is an error naming the key and the value.
pub fn from_meta<'a>(field: impl Fn(&str) -> Option<&'a str>) -> Result<QueueSettings, String> {
    fn number<T: std::str::FromStr>(key: &str, value: Option<&str>) -> Result<Option<T>, String> {
        value
            .map(|text| {
                text.parse::<T>()
                    .map_err(|_| format!("{key}={text:?} is not a number"))
            })
            .transpose()
    }
    let expiry_policy = match field(KEY_EXPIRY_POLICY) {
        None => None,
        Some("drop") => Some(ExpiryPolicy::Drop),
        Some("dead_letter") => Some(ExpiryPolicy::DeadLetter),
        Some(other) => {
            return Err(format!(
                "{KEY_EXPIRY_POLICY}={other:?} is neither drop nor dead_letter"
            ))
        }
    };
    let ordering = match field(KEY_ORDERING) {
        None => None,
        Some("unordered") => Some(QueueOrdering::Unordered),
        Some("per_key") => Some(QueueOrdering::PerKey),
        Some(other) => {
            return Err(format!(
                "{KEY_ORDERING}={other:?} is neither unordered nor per_key"
            ))
        }
    };
    let dlq_topic = match field(KEY_DLQ_TOPIC) {
        None => None,
        Some(name) => {
            validate_topic_name(name).map_err(|error| format!("{KEY_DLQ_TOPIC}: {error}"))?;
            Some(name.to_owned())
        }
    };
    Ok(QueueSettings {
        deliveries_max: number(KEY_DELIVERIES_MAX, field(KEY_DELIVERIES_MAX))?,
        visibility_timeout_ms: number(KEY_VISIBILITY_TIMEOUT_MS, field(KEY_VISIBILITY_TIMEOUT_MS))?,
        retry_delay_ms_min: number(KEY_RETRY_DELAY_MS_MIN, field(KEY_RETRY_DELAY_MS_MIN))?,
        retry_delay_ms_max: number(KEY_RETRY_DELAY_MS_MAX, field(KEY_RETRY_DELAY_MS_MAX))?,
        message_ttl_ms: number(KEY_MESSAGE_TTL_MS, field(KEY_MESSAGE_TTL_MS))?,
        expiry_policy,
        ordering,
        dlq_topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<'a>(text: &'a str) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |key| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
        }
    }

    #[test]
    fn topic_queue_settings_round_trip_through_meta_lines() {
        let settings = QueueSettings {
            deliveries_max: Some(3),
            visibility_timeout_ms: Some(500),
            retry_delay_ms_min: Some(10),
            retry_delay_ms_max: Some(20),
            message_ttl_ms: Some(60_000),
            expiry_policy: Some(ExpiryPolicy::DeadLetter),
            ordering: Some(QueueOrdering::PerKey),
            dlq_topic: Some("failed.orders".into()),
        };
        let text = meta_lines(&settings).join("\n");
        assert_eq!(from_meta(field_of(&text)), Ok(settings));
        // A file from before queue settings: broker defaults everywhere.
        assert_eq!(
            from_meta(field_of("partitions=3\nretention_bytes_max=0\n")),
            Ok(QueueSettings::default())
        );
        let error = from_meta(field_of("queue_ordering=sideways")).unwrap_err();
        assert!(
            error.contains("queue_ordering") && error.contains("sideways"),
            "{error}"
        );
        let error = from_meta(field_of("queue_deliveries_max=many")).unwrap_err();
        assert!(error.contains("queue_deliveries_max"), "{error}");
    }

    #[test]
    fn topic_queue_settings_refused_name_the_setting_and_value() {
        let config = ServerConfig::default();
        let refused = |settings: QueueSettings, key: &str, value: &str| {
            let error = validate("orders", &settings, &config).expect_err(key);
            assert_eq!(error.code, ErrorCode::InvalidRequest);
            assert!(
                error.message.contains(key) && error.message.contains(value),
                "{key} {value}: {error}"
            );
        };
        refused(
            QueueSettings {
                deliveries_max: Some(0),
                ..QueueSettings::default()
            },
            "deliveries_max",
            "0",
        );
        refused(
            QueueSettings {
                visibility_timeout_ms: Some(0),
                ..QueueSettings::default()
            },
            "visibility_timeout_ms",
            "0",
        );
        let past = config.queue_visibility_timeout_ms_max + 1;
        refused(
            QueueSettings {
                visibility_timeout_ms: Some(past),
                ..QueueSettings::default()
            },
            "visibility_timeout_ms",
            &past.to_string(),
        );
        assert!(validate(
            "orders",
            &QueueSettings {
                visibility_timeout_ms: Some(config.queue_visibility_timeout_ms_max),
                ..QueueSettings::default()
            },
            &config
        )
        .is_ok());
        refused(
            QueueSettings {
                retry_delay_ms_min: Some(301_000),
                ..QueueSettings::default()
            },
            "retry_delay_ms_min",
            "301000",
        );
        refused(
            QueueSettings {
                retry_delay_ms_max: Some(0),
                ..QueueSettings::default()
            },
            "retry_delay_ms_max",
            "0",
        );
        refused(
            QueueSettings {
                dlq_topic: Some("orders".into()),
                ..QueueSettings::default()
            },
            "dlq_topic",
            "orders",
        );
        refused(
            QueueSettings {
                dlq_topic: Some("bad/name".into()),
                ..QueueSettings::default()
            },
            "dlq_topic",
            "bad/name",
        );
        assert!(validate("orders", &QueueSettings::default(), &config).is_ok());
    }

    #[test]
    fn group_settings_are_only_the_retry_delays_and_round_trip_through_their_file() {
        let own = QueueSettings {
            retry_delay_ms_min: Some(20),
            retry_delay_ms_max: Some(40),
            ..QueueSettings::default()
        };
        check_group_settings(&own).unwrap();
        let text = group_file_text(&own);
        assert_eq!(
            text,
            "queue_retry_delay_ms_min=20\nqueue_retry_delay_ms_max=40\n"
        );
        assert_eq!(from_group_file(&text).unwrap(), own);
        assert_eq!(from_group_file("").unwrap(), QueueSettings::default());
        let error = from_group_file("queue_deliveries_max=3\n").unwrap_err();
        assert!(error.contains("queue_deliveries_max"), "{error}");
        let error = from_group_file("queue_retry_delay_ms_min=soon\n").unwrap_err();
        assert!(error.contains("soon"), "{error}");

        let refused = check_group_settings(&QueueSettings {
            deliveries_max: Some(3),
            ..own.clone()
        })
        .unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidRequest);
        assert!(
            refused.message.contains("deliveries_max = 3"),
            "{}",
            refused.message
        );
        let refused = check_group_settings(&QueueSettings::default()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidRequest);

        // The group's own delays win over the topic's; the rest is the topic's.
        let topic = QueueSettings {
            deliveries_max: Some(7),
            retry_delay_ms_min: Some(60_000),
            retry_delay_ms_max: Some(60_000),
            ..QueueSettings::default()
        };
        let merged = group_settings(&topic, &own);
        assert_eq!(merged.deliveries_max, Some(7));
        assert_eq!(merged.retry_delay_ms_min, Some(20));
        assert_eq!(merged.retry_delay_ms_max, Some(40));
    }

    #[test]
    fn group_names_use_the_topic_alphabet() {
        for good in ["billing", "a", "g.1_x-y", &"g".repeat(GROUP_NAME_BYTES_MAX)] {
            assert!(validate_group_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "é",
            &"g".repeat(GROUP_NAME_BYTES_MAX + 1),
        ] {
            assert_eq!(
                validate_group_name(bad).unwrap_err().code,
                ErrorCode::InvalidGroupName,
                "{bad}"
            );
        }
    }

    #[test]
    fn merge_replaces_only_what_is_given() {
        let before = QueueSettings {
            deliveries_max: Some(3),
            dlq_topic: Some("x".into()),
            ..QueueSettings::default()
        };
        let after = merge(
            &before,
            &QueueSettings {
                visibility_timeout_ms: Some(9),
                ..QueueSettings::default()
            },
        );
        assert_eq!(after.deliveries_max, Some(3));
        assert_eq!(after.visibility_timeout_ms, Some(9));
        assert_eq!(after.dlq_topic.as_deref(), Some("x"));
    }

    /// The operator lowered limits after topics stored larger values: the topic loads
    /// with the limits' values (each cut named), and what it resolves to is valid.
    #[test]
    fn stored_settings_past_lowered_limits_are_cut_to_them() {
        let config = ServerConfig {
            queue_visibility_timeout_ms_max: 60_000,
            queue_visibility_timeout_ms_default: 30_000,
            queue_retry_delay_ms_min: 1_000,
            ..ServerConfig::default()
        };
        let stored = QueueSettings {
            visibility_timeout_ms: Some(600_000),
            retry_delay_ms_max: Some(500),
            ..QueueSettings::default()
        };
        let (fitted, cuts) = fit_to_limits(&stored, &config);
        assert_eq!(fitted.visibility_timeout_ms, Some(60_000));
        assert_eq!(fitted.retry_delay_ms_min, Some(500));
        assert_eq!(cuts.len(), 2, "{cuts:?}");
        assert_eq!(
            cuts[0].to_string(),
            "queue setting visibility_timeout_ms = 600000 does not fit queue_visibility_timeout_ms_max = 60000; using 60000"
        );
        assert_eq!(cuts[1].key, "retry_delay_ms_min");
        resolve(&config, &stored, "orders", "g", 0)
            .validate()
            .expect("what a stored topic resolves to is always valid");
        // Settings that fit are untouched.
        let (same, cuts) = fit_to_limits(&QueueSettings::default(), &config);
        assert_eq!(same, QueueSettings::default());
        assert!(cuts.is_empty());
    }

    #[test]
    fn a_default_dead_letter_name_past_the_name_limit_is_refused() {
        let long = "t".repeat(crate::protocol::TOPIC_NAME_BYTES_MAX - 1);
        let error = validate_dead_letter_name(&long, &QueueSettings::default()).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidTopicName);
        assert!(error.message.contains("dlq_topic"), "{error}");
        let named = QueueSettings {
            dlq_topic: Some("short.dlq".into()),
            ..QueueSettings::default()
        };
        validate_dead_letter_name(&long, &named).unwrap();
        validate_dead_letter_name("orders", &QueueSettings::default()).unwrap();
    }
}
