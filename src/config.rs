//! The service's settings: one typed struct, filled from a TOML file, then
//! the environment (`PEREGRINE_…`), then command-line flags, each layer
//! overriding the one before. An unknown key is an error that names it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// False runs the HTTP API alone, with no Kafka at all.
    pub kafka_enabled: bool,
    pub group_id: String,
    pub input_topic: String,
    pub alert_topic: String,
    pub label_topic: String,
    pub dlq_topic: String,
    /// Every scored transaction with its score and decision, for audit and
    /// for comparing runs; off when empty.
    pub score_topic: String,
    pub http_addr: String,
    /// Model file; the built-in model when unset.
    pub model: Option<PathBuf>,
    /// Rules file; the built-in rules when unset.
    pub rules: Option<PathBuf>,
    pub review_threshold: Option<f64>,
    pub block_threshold: Option<f64>,
    /// Bearer token for `POST /v1/model/reload` and for scoring with
    /// `update=true`; both are refused when unset.
    pub admin_token: Option<String>,
    /// A file holding the admin token (a mounted Kubernetes Secret), read
    /// at start; instead of `admin_token`.
    pub admin_token_file: Option<PathBuf>,
    /// A bearer token for the analysts' routes (`POST /v1/alerts/{id}/decision`),
    /// besides the admin token, which they also take.
    pub analyst_token: Option<String>,
    /// A file holding the analyst token, read at start; instead of `analyst_token`.
    pub analyst_token_file: Option<PathBuf>,
    /// The alert store, a PostgreSQL connection string
    /// (`postgres://user:password@host/db`). When set, `serve` also runs the
    /// alert sink and the `/v1/alerts` routes. A secret: never logged.
    pub postgres: Option<String>,
    /// The consumer group of the alert sinks.
    pub sink_group_id: String,
    /// The only directory `POST /v1/model/reload` loads model and rules
    /// files from; a path outside it is refused.
    pub models_dir: PathBuf,
    /// Seconds the service may take to drain and commit after SIGTERM.
    pub shutdown_timeout_secs: u64,
    /// Larger Kafka messages are dead-lettered as oversize.
    pub max_message_bytes: usize,
    /// Larger HTTP request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Restore a newly assigned partition's card state from its changelog
    /// before scoring it; false starts it empty.
    pub rebuild_on_assign: bool,
    /// Seconds between checkpoints of each partition's card state to its
    /// changelog; the input topic must keep at least twice this plus an hour.
    pub checkpoint_interval_secs: u64,
    /// Partitions of the merchant-events and merchants changelog topics;
    /// 0 takes the input topic's count. Fixed once the topics exist.
    pub merchant_partitions: u32,
    /// How far, in event time, the merchant table may lag a transaction
    /// scored against it: a transaction waits until every partition's
    /// transactions up to this long before it are in the table.
    pub merchant_max_lag_secs: i64,
    /// How long, in milliseconds, a partition's progress may stand still
    /// before the others stop waiting for it (until it moves again): a
    /// partition restoring, or unowned after a crash, holds the others up
    /// once, for this long. Counted in the wait timeouts.
    pub merchant_wait_ms: u64,
    /// Seconds between the status lines in the log; 0 turns them off.
    pub log_interval_secs: u64,
    /// How far ahead of this machine's clock, in seconds, a transaction's
    /// or a label's time may be. Later ones are dead-lettered
    /// (`future_timestamp`) and never reach the state: one message dated
    /// 9999 would otherwise move every window past everything else.
    #[serde(alias = "max_clock_skew")]
    pub max_clock_skew_secs: u64,
    /// Larger amounts are dead-lettered (`amount_over_limit`), and refused
    /// over HTTP with 422.
    pub max_amount: f64,
    /// Seconds a running input partition may hold records read but not
    /// finished (scored, output acknowledged) before `/readyz` fails.
    pub partition_stall_secs: u64,
    /// HTTP scoring requests in progress at most; more are refused at once
    /// with 503 and `Retry-After`, so an overload is shed, not queued.
    pub http_max_concurrency: usize,
    /// Threads of the HTTP API's own runtime; 0 chooses: half the cores
    /// beside Kafka (a flood of requests then cannot take more than half
    /// the machine from the partitions), every core without it.
    pub http_threads: usize,
    /// Milliseconds an HTTP scoring request may take, its wait for a
    /// scoring slot included, before it is answered 503.
    pub http_timeout_ms: u64,
    /// Cards kept for `update=true` scoring of cards no Kafka partition
    /// holds: at most this many, the least recently used dropped first.
    pub http_max_cards: usize,
    /// Seconds of wall-clock time without a request after which such a
    /// card is dropped.
    pub http_card_idle_secs: u64,
    /// Raw librdkafka properties (SASL, TLS, timeouts), passed through as given.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            kafka_enabled: true,
            group_id: "peregrine".into(),
            input_topic: "transactions".into(),
            alert_topic: "fraud-alerts".into(),
            label_topic: "fraud-labels".into(),
            dlq_topic: "transactions-dlq".into(),
            score_topic: String::new(),
            http_addr: "127.0.0.1:8080".into(),
            model: None,
            rules: None,
            review_threshold: None,
            block_threshold: None,
            admin_token: None,
            admin_token_file: None,
            analyst_token: None,
            analyst_token_file: None,
            postgres: None,
            sink_group_id: "peregrine-alert-sink".into(),
            models_dir: PathBuf::from("models"),
            shutdown_timeout_secs: 20,
            max_message_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            rebuild_on_assign: true,
            checkpoint_interval_secs: 30,
            merchant_partitions: 0,
            merchant_max_lag_secs: 60,
            merchant_wait_ms: 5000,
            log_interval_secs: 10,
            max_clock_skew_secs: 600,
            max_amount: 1e9,
            partition_stall_secs: 60,
            http_max_concurrency: 256,
            http_threads: 0,
            http_timeout_ms: 2000,
            http_max_cards: 100_000,
            http_card_idle_secs: 31 * 86_400,
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Keys whose values are not strings, so the environment's text is parsed.
const TYPED_KEYS: &[&str] = &[
    "kafka_enabled",
    "review_threshold",
    "block_threshold",
    "shutdown_timeout_secs",
    "max_message_bytes",
    "max_body_bytes",
    "rebuild_on_assign",
    "checkpoint_interval_secs",
    "merchant_partitions",
    "merchant_max_lag_secs",
    "merchant_wait_ms",
    "log_interval_secs",
    "max_clock_skew_secs",
    "max_clock_skew",
    "max_amount",
    "partition_stall_secs",
    "http_max_concurrency",
    "http_threads",
    "http_timeout_ms",
    "http_max_cards",
    "http_card_idle_secs",
];

const KEYS: &[&str] = &[
    "brokers",
    "kafka_enabled",
    "group_id",
    "input_topic",
    "alert_topic",
    "label_topic",
    "dlq_topic",
    "score_topic",
    "http_addr",
    "model",
    "rules",
    "review_threshold",
    "block_threshold",
    "admin_token",
    "admin_token_file",
    "analyst_token",
    "analyst_token_file",
    "postgres",
    "sink_group_id",
    "models_dir",
    "shutdown_timeout_secs",
    "max_message_bytes",
    "max_body_bytes",
    "rebuild_on_assign",
    "checkpoint_interval_secs",
    "merchant_partitions",
    "merchant_max_lag_secs",
    "merchant_wait_ms",
    "log_interval_secs",
    "max_clock_skew_secs",
    "max_clock_skew",
    "max_amount",
    "partition_stall_secs",
    "http_max_concurrency",
    "http_threads",
    "http_timeout_ms",
    "http_max_cards",
    "http_card_idle_secs",
];

pub const ENV_PREFIX: &str = "PEREGRINE_";
/// `PEREGRINE_LIBRDKAFKA_SASL_PASSWORD` sets the librdkafka property `sasl.password`.
const ENV_LIBRDKAFKA: &str = "PEREGRINE_LIBRDKAFKA_";
/// Names the settings file; not a setting itself.
pub const ENV_CONFIG: &str = "PEREGRINE_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the settings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("settings file {path}: {message}")]
    File { path: String, message: String },
    #[error("unknown environment variable {0}: no such setting")]
    UnknownEnv(String),
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Settings {
    /// The HTTP runtime's threads: `http_threads`, or when it is 0 half the
    /// cores beside Kafka and every core without it.
    pub fn http_threads(&self) -> usize {
        if self.http_threads > 0 {
            return self.http_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.kafka_enabled {
            (cores / 2).max(1)
        } else {
            cores
        }
    }

    /// The file's settings over the defaults, then the environment's over those.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                    path: path.display().to_string(),
                    message: e.message().to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let file_name = file.map(|p| p.display().to_string());
        // Checked before the environment is merged, so an error names its source.
        if let Some(path) = &file_name {
            Settings::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                ConfigError::File {
                    path: path.clone(),
                    message: e.message().to_string(),
                }
            })?;
        }
        for (var, value) in env {
            let Some(name) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if var == ENV_CONFIG {
                continue;
            }
            if let Some(option) = var.strip_prefix(ENV_LIBRDKAFKA) {
                let key = option.to_ascii_lowercase().replace('_', ".");
                let raw = table
                    .entry("librdkafka")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = raw {
                    t.insert(key, toml::Value::String(value));
                }
                continue;
            }
            let key = name.to_ascii_lowercase();
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::UnknownEnv(var));
            }
            let parsed = if TYPED_KEYS.contains(&key.as_str()) {
                format!("v = {value}")
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .ok_or_else(|| ConfigError::Env {
                        var: var.clone(),
                        message: format!("`{value}` is not a number or boolean"),
                    })?
            } else {
                toml::Value::String(value)
            };
            table.insert(key, parsed);
        }
        let mut settings =
            Settings::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Env {
                var: "PEREGRINE_*".into(),
                message: e.message().to_string(),
            })?;
        settings.admin_token = token_from_file(
            "admin_token_file",
            settings.admin_token_file.as_deref(),
            settings.admin_token.take(),
        )?;
        settings.analyst_token = token_from_file(
            "analyst_token_file",
            settings.analyst_token_file.as_deref(),
            settings.analyst_token.take(),
        )?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.analyst_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid {
                key: "analyst_token",
                message: "must be at least 16 characters".into(),
            });
        }
        if self
            .postgres
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
            || self.sink_group_id.trim().is_empty()
        {
            return Err(ConfigError::Invalid {
                key: "postgres",
                message: "the connection string and sink_group_id must not be empty".into(),
            });
        }
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.kafka_enabled {
            for (key, v) in [
                ("brokers", &self.brokers),
                ("group_id", &self.group_id),
                ("input_topic", &self.input_topic),
                ("alert_topic", &self.alert_topic),
                ("label_topic", &self.label_topic),
                ("dlq_topic", &self.dlq_topic),
            ] {
                if v.trim().is_empty() {
                    return invalid(key, "must not be empty");
                }
            }
        }
        if self.http_addr.parse::<std::net::SocketAddr>().is_err() {
            return invalid("http_addr", "expected an address such as 0.0.0.0:8080");
        }
        for (key, t) in [
            ("review_threshold", self.review_threshold),
            ("block_threshold", self.block_threshold),
        ] {
            if let Some(t) = t
                && !(0.0..=1.0).contains(&t)
            {
                return invalid(key, "must be between 0 and 1");
            }
        }
        if self.max_message_bytes == 0 || self.max_body_bytes == 0 {
            return invalid("max_message_bytes", "limits must be positive");
        }
        if self.checkpoint_interval_secs == 0 {
            return invalid("checkpoint_interval_secs", "must be at least 1");
        }
        if self.merchant_max_lag_secs < 0 {
            return invalid("merchant_max_lag_secs", "must not be negative");
        }
        if !(self.max_amount.is_finite() && self.max_amount > 0.0) {
            return invalid("max_amount", "must be a positive number");
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return invalid("admin_token", "must be at least 16 characters");
        }
        if self.http_max_concurrency == 0 || self.http_timeout_ms == 0 {
            return invalid("http_max_concurrency", "HTTP limits must be positive");
        }
        if self.partition_stall_secs == 0 {
            return invalid("partition_stall_secs", "must be at least 1");
        }
        Ok(())
    }
}

/// A token given directly, or read from its file (a mounted Secret).
fn token_from_file(
    key: &'static str,
    file: Option<&std::path::Path>,
    given: Option<String>,
) -> Result<Option<String>, ConfigError> {
    let Some(path) = file else {
        return Ok(given);
    };
    if given.is_some() {
        return Err(ConfigError::Invalid {
            key,
            message: "set the token or its file, not both".into(),
        });
    }
    // Never the file's text in an error: it is a secret.
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key,
        message: format!("cannot read {}: {}", path.display(), e.kind()),
    })?;
    Ok(Some(text.trim().to_string()))
}

/// A librdkafka property whose value must not reach a log.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|s| k.contains(s))
        && !k.ends_with(".location")
}

/// Secrets are redacted, so the settings can be logged at start.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("Settings")
            .field("brokers", &self.brokers)
            .field("kafka_enabled", &self.kafka_enabled)
            .field("group_id", &self.group_id)
            .field("input_topic", &self.input_topic)
            .field("alert_topic", &self.alert_topic)
            .field("label_topic", &self.label_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("score_topic", &self.score_topic)
            .field("http_addr", &self.http_addr)
            .field("model", &self.model)
            .field("rules", &self.rules)
            .field("review_threshold", &self.review_threshold)
            .field("block_threshold", &self.block_threshold)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("admin_token_file", &self.admin_token_file)
            .field(
                "analyst_token",
                &self.analyst_token.as_ref().map(|_| "<redacted>"),
            )
            .field("analyst_token_file", &self.analyst_token_file)
            .field("postgres", &self.postgres.as_ref().map(|_| "<redacted>"))
            .field("sink_group_id", &self.sink_group_id)
            .field("models_dir", &self.models_dir)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("rebuild_on_assign", &self.rebuild_on_assign)
            .field("checkpoint_interval_secs", &self.checkpoint_interval_secs)
            .field("merchant_partitions", &self.merchant_partitions)
            .field("merchant_max_lag_secs", &self.merchant_max_lag_secs)
            .field("merchant_wait_ms", &self.merchant_wait_ms)
            .field("log_interval_secs", &self.log_interval_secs)
            .field("max_clock_skew_secs", &self.max_clock_skew_secs)
            .field("max_amount", &self.max_amount)
            .field("partition_stall_secs", &self.partition_stall_secs)
            .field("http_max_concurrency", &self.http_max_concurrency)
            .field("http_threads", &self.http_threads)
            .field("http_timeout_ms", &self.http_timeout_ms)
            .field("http_max_cards", &self.http_max_cards)
            .field("http_card_idle_secs", &self.http_card_idle_secs)
            .field("librdkafka", &raw)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile_path::Path {
        tempfile_path::Path::new(text)
    }

    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn new(text: &str) -> Path {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!(
                    "peregrine-settings-{}-{n}.toml",
                    std::process::id()
                ));
                std::fs::write(&p, text).unwrap();
                Path(p)
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn environment_overrides_file() {
        let f = write(
            "group_id = \"from-file\"\nshutdown_timeout_secs = 5\n[librdkafka]\n\"security.protocol\" = \"sasl_plaintext\"\n",
        );
        let s = Settings::load(
            Some(&f.0),
            env(&[
                ("PEREGRINE_GROUP_ID", "from-env"),
                ("PEREGRINE_MAX_BODY_BYTES", "2048"),
                ("PEREGRINE_LIBRDKAFKA_SASL_PASSWORD", "hunter2"),
                ("HOME", "/ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.group_id, "from-env");
        assert_eq!(s.shutdown_timeout_secs, 5);
        assert_eq!(s.max_body_bytes, 2048);
        assert_eq!(s.librdkafka["security.protocol"], "sasl_plaintext");
        assert_eq!(s.librdkafka["sasl.password"], "hunter2");
        let logged = format!("{s:?}");
        assert!(!logged.contains("hunter2"), "{logged}");
    }

    #[test]
    fn http_threads_leave_the_kafka_path_half_the_cores_unless_set() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let beside_kafka = Settings::load(None, env(&[])).unwrap();
        assert!(beside_kafka.kafka_enabled);
        assert_eq!(beside_kafka.http_threads(), (cores / 2).max(1));
        let alone = Settings::load(None, env(&[("PEREGRINE_KAFKA_ENABLED", "false")])).unwrap();
        assert_eq!(alone.http_threads(), cores);
        let set = Settings::load(None, env(&[("PEREGRINE_HTTP_THREADS", "3")])).unwrap();
        assert_eq!(set.http_threads(), 3);
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = write("brokers = \"a:1\"\ngroup = \"x\"\n");
        let e = Settings::load(Some(&f.0), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `group`"), "{e}");
        let e = Settings::load(None, env(&[("PEREGRINE_GROUPID", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PEREGRINE_GROUPID"), "{e}");
        let e = Settings::load(None, env(&[("PEREGRINE_MAX_BODY_BYTES", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PEREGRINE_MAX_BODY_BYTES"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let s = Settings {
            http_addr: "nowhere".into(),
            ..Settings::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("http_addr"));
        let s = Settings {
            admin_token: Some("short".into()),
            ..Settings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("admin_token")
        );
        assert!(Settings::default().validate().is_ok());
    }

    /// The token comes from a file, trimmed; a missing file is named
    /// without its contents, and both ways at once are refused.
    #[test]
    fn admin_token_from_a_file() {
        let token = write("  s3cret-s3cret-s3cret\n");
        let f = write(&format!(
            "admin_token_file = {:?}\n",
            token.0.display().to_string()
        ));
        let s = Settings::load(Some(&f.0), env(&[])).unwrap();
        assert_eq!(s.admin_token.as_deref(), Some("s3cret-s3cret-s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
        let e = Settings::load(
            Some(&f.0),
            env(&[("PEREGRINE_ADMIN_TOKEN", "another-token-0123")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both"), "{e}");
        let e = Settings::load(
            None,
            env(&[("PEREGRINE_ADMIN_TOKEN_FILE", "/nonexistent/token")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("admin_token_file") && e.contains("/nonexistent/token"),
            "{e}"
        );
    }
}
