//! Configuration: one typed struct, read once from flags and environment.
//!
//! Every option is also an environment variable (shown in `--help`); a `.env`
//! file in the working directory is read first when present. Secrets are
//! wrapped in [`Secret`] so that they never show up in `Debug` output or logs.

use std::{fmt, net::SocketAddr, time::Duration};

use clap::{
    ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum,
    parser::ValueSource,
};

#[derive(Debug, Parser)]
#[command(name = "chat-service", version, about = "Clash of Code chat service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, the default command.
    #[command(flatten)]
    pub serve: ServeConfig,
}

impl Cli {
    /// Parses the command line and environment, then fills secrets given as
    /// files (`JWT_SECRET_FILE`, `DATABASE_URL_FILE`, `REDIS_URL_FILE`) —
    /// the way Kubernetes and Docker mount secrets.
    pub fn load() -> anyhow::Result<Self> {
        let matches = Self::command().get_matches();
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        cli.serve
            .fill_secret_files(&matches, |name| std::env::var_os(name))?;
        Ok(cli)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Mint a token signed with the configured secret (local use and tests).
    Token(TokenArgs),
    /// Print the OpenAPI document (YAML) and exit.
    Openapi,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// User id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Display name (`name` claim).
    #[arg(long)]
    pub name: Option<String>,
    /// Role to grant (admin, moderator, service); repeatable.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Lifetime of the token, e.g. `1h`, `30m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

/// A value that must never be printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "HS384")]
    Hs384,
    #[value(name = "HS512")]
    Hs512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn duration(raw: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(raw)
}

/// Everything `serve` needs. Defaults are the contract's.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(
        long,
        global = true,
        env = "LISTEN_ADDR",
        default_value = "0.0.0.0:8001"
    )]
    pub listen: SocketAddr,

    /// Database: `sqlite://path` (embedded) or `postgres://…` (cluster).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "sqlite://chat.db",
        hide_env_values = true
    )]
    pub database_url: Secret,

    /// Redis for cluster mode; unset means in-process fan-out, presence and limits.
    #[arg(long, global = true, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Prefix of every Redis key and channel (several deployments may share a Redis).
    #[arg(long, global = true, env = "REDIS_KEY_PREFIX", default_value = "chat:")]
    pub redis_key_prefix: String,

    /// Cluster mode: a pod that stopped refreshing its presence for this
    /// long (killed) no longer counts; pods refresh every third of it.
    #[arg(long, global = true, env = "PRESENCE_TTL", default_value = "30s", value_parser = duration)]
    pub presence_ttl: Duration,

    /// Cluster mode: how often each pod compares its rooms with the store
    /// to deliver messages whose bus event was lost.
    #[arg(long, global = true, env = "RESYNC_INTERVAL", default_value = "5s", value_parser = duration)]
    pub resync_interval: Duration,

    /// Cluster mode: newest messages per room kept in the Redis cache.
    #[arg(
        long,
        global = true,
        env = "CACHE_RECENT_MESSAGES",
        default_value_t = 500
    )]
    pub cache_recent_messages: usize,

    /// Shared secret the Core service signs tokens with. Required.
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// The one signing algorithm accepted.
    #[arg(long, global = true, env = "JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: JwtAlgorithm,

    /// Required `iss` claim, when set.
    #[arg(long, global = true, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long, global = true, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock leeway for `exp`/`nbf`, and grace after `exp` before a socket is closed.
    #[arg(long, global = true, env = "JWT_LEEWAY", default_value = "5s", value_parser = duration)]
    pub jwt_leeway: Duration,

    /// Apply migrations at start-up.
    #[arg(long, global = true, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Longest message body, in characters.
    #[arg(long, global = true, env = "MAX_MESSAGE_CHARS", default_value_t = 2000)]
    pub max_message_chars: usize,

    /// Largest WebSocket frame accepted, in bytes (1009 past it).
    #[arg(long, global = true, env = "MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest REST request body, in bytes (413 past it).
    #[arg(long, global = true, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Most messages replayed on resume (`since`).
    #[arg(long, global = true, env = "REPLAY_LIMIT", default_value_t = 500)]
    pub replay_limit: u32,

    /// Sends (WebSocket and REST together) allowed per user per window.
    #[arg(long, global = true, env = "SEND_RATE_LIMIT", default_value_t = 10)]
    pub send_rate_limit: u32,

    #[arg(long, global = true, env = "SEND_RATE_WINDOW", default_value = "10s", value_parser = duration)]
    pub send_rate_window: Duration,

    /// WebSocket connection attempts allowed per client IP per window.
    #[arg(long, global = true, env = "CONNECT_RATE_LIMIT", default_value_t = 120)]
    pub connect_rate_limit: u32,

    #[arg(long, global = true, env = "CONNECT_RATE_WINDOW", default_value = "60s", value_parser = duration)]
    pub connect_rate_window: Duration,

    /// Other REST requests allowed per user per window.
    #[arg(long, global = true, env = "REST_RATE_LIMIT", default_value_t = 600)]
    pub rest_rate_limit: u32,

    #[arg(long, global = true, env = "REST_RATE_WINDOW", default_value = "60s", value_parser = duration)]
    pub rest_rate_window: Duration,

    /// At most one `typing` per user per room per this interval.
    #[arg(long, global = true, env = "TYPING_INTERVAL", default_value = "2s", value_parser = duration)]
    pub typing_interval: Duration,

    /// Server ping interval.
    #[arg(long, global = true, env = "PING_INTERVAL", default_value = "25s", value_parser = duration)]
    pub ping_interval: Duration,

    /// A connection that sent nothing for this long is closed.
    #[arg(long, global = true, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// Frames queued for one connection before it is closed as too slow (4008).
    #[arg(long, global = true, env = "OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Rooms with at least this many connections on one instance batch their
    /// fan-out when the instance falls behind (see `BIG_ROOM_LINGER`).
    #[arg(
        long,
        global = true,
        env = "BIG_ROOM_CONNECTIONS",
        default_value_t = 200
    )]
    pub big_room_connections: usize,

    /// In a big room, an event that follows the room's previous fan-out
    /// within this long waits for the end of it and goes out with the
    /// others that arrived meanwhile, one write per connection (0 = never).
    #[arg(long, global = true, env = "BIG_ROOM_LINGER", default_value = "30ms", value_parser = duration)]
    pub big_room_linger: Duration,

    /// A big room batches for a second after one of its messages reached
    /// this instance's fan-out more than this long after its send was
    /// received, i.e. while the instance is falling behind (0 = always).
    #[arg(long, global = true, env = "BIG_ROOM_LAG", default_value = "5ms", value_parser = duration)]
    pub big_room_lag: Duration,

    /// Frames one connection may send per 10 s before it is closed for abuse (4029).
    #[arg(long, global = true, env = "FRAME_FLOOD_LIMIT", default_value_t = 200)]
    pub frame_flood_limit: u32,

    /// A connection that has not sent its first request's line and headers
    /// this long after it was accepted is closed (0 = no limit).
    #[arg(long, global = true, env = "REQUEST_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub request_header_timeout: Duration,

    /// A keep-alive connection whose next request's line and headers have
    /// not arrived this long after the previous response began is closed
    /// (0 = no limit). Keep it above the idle timeout of any load balancer
    /// that reuses connections to the service.
    #[arg(long, global = true, env = "KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = duration)]
    pub keep_alive_timeout: Duration,

    /// A write to a socket that takes longer than this closes it as too slow.
    #[arg(long, global = true, env = "WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,

    /// How long shutdown waits for connections to drain.
    #[arg(long, global = true, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Browser origins allowed to open WebSockets (comma-separated, e.g.
    /// `https://www.codingame.com`); a handshake whose `Origin` is another
    /// is refused with 403. Unset: any origin. Clients that send no
    /// `Origin` (not browsers) are never refused for it.
    #[arg(long, global = true, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Take the client IP from the last `X-Forwarded-For` entry (behind a proxy).
    #[arg(long, global = true, env = "TRUST_FORWARDED_FOR", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,

    /// Development only: let anyone who can reach the service mint a token
    /// for any user (`POST /dev/token`, the web client's "mint" button).
    #[arg(long, global = true, env = "DEV_TOKENS", action = clap::ArgAction::SetTrue)]
    pub dev_tokens: bool,

    /// Log format: text or json. Filter with RUST_LOG.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// The secrets that may also be given as a file: (argument id, variable).
const SECRET_FILE_VARS: [(&str, &str); 3] = [
    ("jwt_secret", "JWT_SECRET"),
    ("database_url", "DATABASE_URL"),
    ("redis_url", "REDIS_URL"),
];

/// Reads a secret from the file named by `{var}_FILE`. One trailing newline
/// (as `echo` and most editors leave) is dropped; any other whitespace is
/// kept, since it may be part of the secret.
fn read_secret_file(var: &str, path: &std::ffi::OsStr) -> anyhow::Result<Secret> {
    let mut value = std::fs::read_to_string(path).map_err(|err| {
        anyhow::anyhow!(
            "{var}_FILE: cannot read {}: {err}",
            std::path::Path::new(path).display()
        )
    })?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(Secret::new(value))
}

/// True when the value was given explicitly (flag or plain variable); only
/// values that were not may come from a `_FILE` variable.
fn given_explicitly(source: Option<ValueSource>) -> bool {
    matches!(
        source,
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

impl ServeConfig {
    /// For each secret not given by flag or plain variable, reads the file
    /// named by its `_FILE` variable (looked up with `lookup`), if set.
    pub fn fill_secret_files(
        &mut self,
        matches: &ArgMatches,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> anyhow::Result<()> {
        for (id, var) in SECRET_FILE_VARS {
            if given_explicitly(matches.value_source(id)) {
                continue;
            }
            let Some(path) = lookup(&format!("{var}_FILE")).filter(|p| !p.is_empty()) else {
                continue;
            };
            let secret = read_secret_file(var, &path)?;
            match id {
                "jwt_secret" => self.jwt_secret = Some(secret),
                "database_url" => self.database_url = secret,
                _ => self.redis_url = Some(secret),
            }
        }
        Ok(())
    }

    /// Whether a WebSocket handshake with this `Origin` header may proceed.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        let origin = origin.trim().trim_end_matches('/');
        self.allowed_origins.is_empty()
            || self.allowed_origins.iter().any(|allowed| {
                let allowed = allowed.trim().trim_end_matches('/');
                allowed == "*" || allowed.eq_ignore_ascii_case(origin)
            })
    }

    /// The secret, or a clear error naming the variable.
    pub fn require_secret(&self) -> anyhow::Result<&Secret> {
        match &self.jwt_secret {
            Some(secret) if !secret.expose().is_empty() => Ok(secret),
            _ => anyhow::bail!(
                "JWT_SECRET is not set: set it (environment, JWT_SECRET_FILE, .env file or \
                 --jwt-secret) to the secret the Core service signs tokens with"
            ),
        }
    }

    /// Refuses timings that would close healthy connections: a client that
    /// only answers pings is heard from once per `PING_INTERVAL` (plus the
    /// ping's lateness), so `IDLE_TIMEOUT` must be longer than that.
    pub fn check_keepalive(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.ping_interval.is_zero(),
            "PING_INTERVAL must be longer than zero"
        );
        let gap = crate::ws::PingGrid::longest_gap(self.ping_interval);
        anyhow::ensure!(
            self.idle_timeout > gap,
            "IDLE_TIMEOUT ({}) must be longer than PING_INTERVAL ({}) and the up to {} a ping \
             may be late: a client that only answers pings would be closed as idle; keep it \
             well above (the defaults are 60s and 25s)",
            humantime::format_duration(self.idle_timeout),
            humantime::format_duration(self.ping_interval),
            humantime::format_duration(gap - self.ping_interval),
        );
        Ok(())
    }

    /// Defaults suitable for tests: every value as in production except the
    /// listen address (port 0) and the given database.
    pub fn for_tests(database_url: &str, secret: &str) -> Self {
        let cli = Cli::parse_from(["chat-service"]);
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            database_url: Secret::new(database_url),
            jwt_secret: Some(Secret::new(secret)),
            ..cli.serve
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str], lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> ServeConfig {
        let matches = Cli::command().get_matches_from(args);
        let mut config = Cli::from_arg_matches(&matches).unwrap().serve;
        config.fill_secret_files(&matches, lookup).unwrap();
        config
    }

    #[test]
    fn secret_files_fill_secrets_not_given_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path.into_os_string()
        };
        let jwt = path("jwt", "s3cret \n");
        let db = path("db", "postgres://u:p@db/chat\r\n");
        let redis = path("redis", "redis://redis:6379");
        let lookup = |name: &str| match name {
            "JWT_SECRET_FILE" => Some(jwt.clone()),
            "DATABASE_URL_FILE" => Some(db.clone()),
            "REDIS_URL_FILE" => Some(redis.clone()),
            _ => None,
        };
        // Flags stand in for the plain variables (the test process's
        // environment is not ours to change): they win over the files.
        let explicit = config(
            &[
                "chat-service",
                "--jwt-secret",
                "flag",
                "--database-url",
                "sqlite://x.db",
                "--redis-url",
                "redis://flag",
            ],
            lookup,
        );
        assert_eq!(explicit.require_secret().unwrap().expose(), "flag");
        assert_eq!(explicit.database_url.expose(), "sqlite://x.db");
        assert_eq!(explicit.redis_url.unwrap().expose(), "redis://flag");

        // Without them the files supply the values, minus one line ending.
        let matches = Cli::command().get_matches_from(["chat-service"]);
        let from_files = config(&["chat-service"], lookup);
        if !given_explicitly(matches.value_source("jwt_secret")) {
            assert_eq!(from_files.require_secret().unwrap().expose(), "s3cret ");
        }
        if !given_explicitly(matches.value_source("database_url")) {
            assert_eq!(from_files.database_url.expose(), "postgres://u:p@db/chat");
        }
        if !given_explicitly(matches.value_source("redis_url")) {
            assert_eq!(from_files.redis_url.unwrap().expose(), "redis://redis:6379");
        }
    }

    #[test]
    fn an_unreadable_secret_file_names_its_variable() {
        let err = read_secret_file("REDIS_URL", std::ffi::OsStr::new("/nonexistent/redis-url"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("REDIS_URL_FILE"), "{err}");
        assert!(err.contains("/nonexistent/redis-url"), "{err}");
    }

    #[test]
    fn origins_are_checked_only_when_configured() {
        let mut config = ServeConfig::for_tests("sqlite::memory:", "s");
        assert!(config.origin_allowed(Some("https://evil.example")));
        config.allowed_origins = vec![
            "https://play.example".into(),
            "http://localhost:3000/".into(),
        ];
        assert!(
            config.origin_allowed(None),
            "non-browser clients send no Origin"
        );
        assert!(config.origin_allowed(Some("https://play.example")));
        assert!(config.origin_allowed(Some("HTTPS://PLAY.EXAMPLE")));
        assert!(config.origin_allowed(Some("http://localhost:3000")));
        assert!(!config.origin_allowed(Some("https://evil.example")));
        assert!(!config.origin_allowed(Some("https://play.example.evil.example")));
        assert!(!config.origin_allowed(Some("null")));
        let parsed = config_from(&[
            "chat-service",
            "--allowed-origins",
            "https://a.example,https://b.example",
        ]);
        assert_eq!(
            parsed.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    fn config_from(args: &[&str]) -> ServeConfig {
        Cli::from_arg_matches(&Cli::command().get_matches_from(args))
            .unwrap()
            .serve
    }

    #[test]
    fn only_flags_and_plain_variables_win_over_files() {
        assert!(given_explicitly(Some(ValueSource::CommandLine)));
        assert!(given_explicitly(Some(ValueSource::EnvVariable)));
        assert!(!given_explicitly(Some(ValueSource::DefaultValue)));
        assert!(!given_explicitly(None));
    }
}
