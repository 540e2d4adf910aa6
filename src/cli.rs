//! The command line a ferrostream service gains with one line (feature `cli`), on clap.
//!
//! ```text
//! my-service [run]   [--broker URL] [--log-level LEVEL] [--log-format text|json]
//!                    [--http HOST:PORT|off] [--allow-publish]
//! my-service docs gen   [--yaml | --json] [--output FILE]
//! my-service docs serve [--host HOST] [--port PORT] [--allow-publish]
//! my-service publish TOPIC PAYLOAD [--key KEY] [--header NAME=VALUE]... [--timeout SECONDS]
//! ```
//!
//! `--broker` (or `FERROSTREAM_BROKER`) replaces the URL the broker was created with, for every
//! subcommand; logs go to stderr (so `docs gen` output can be piped), at `--log-level` (default `info`,
//! or `RUST_LOG` when set), as text or JSON lines. Every subcommand has `--help`; a mistake exits non-zero
//! with a message that names it.
//!
//! ```no_run
//! use ferrostream::{App, Broker};
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let broker = Broker::new("memory://").expect("a valid URL");
//!     broker.subscriber("orders").handle(|body: String| async move { println!("{body}") });
//!     App::new(broker).title("shop").run_cli().await
//! }
//! ```

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::app::App;
use crate::docs::Docs;

/// Where `run` serves its HTTP routes unless told otherwise.
pub const DEFAULT_HTTP: &str = "0.0.0.0:8000";

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Broker URL (replaces the one the service was built with): memory://, kafka://host:port,
    /// amqp://user:password@host:port/vhost.
    #[arg(long, global = true, env = "FERROSTREAM_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// Log level or filter (`info`, `debug`, `ferrostream=debug,warn`...); default `info`, or RUST_LOG.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service until Ctrl-C or SIGTERM, then shuts down gracefully (the default).
    Run {
        /// Where the service's HTTP server listens while it runs: /health/live, /health/ready, /metrics,
        /// /docs, /asyncapi.json, /asyncapi.yaml (`off`: no server).
        #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_HTTP)]
        http: String,
        /// Lets the docs page publish test messages to the service's channels (off by default: never on
        /// a page production users can reach).
        #[arg(long)]
        allow_publish: bool,
        /// Kafka static membership: this instance's stable name (a pod name), so that a restart takes its
        /// partitions back at once instead of waiting out its session (README, "Kafka settings").
        #[arg(long, env = "FERROSTREAM_INSTANCE_ID", value_name = "ID")]
        instance_id: Option<String>,
    },
    /// The service's AsyncAPI 3.0 document and docs page.
    Docs {
        #[command(subcommand)]
        command: DocsCommand,
    },
    /// Publishes one message and prints the broker's acknowledgement.
    Publish {
        /// The topic (on RabbitMQ: the queue or routing key).
        topic: String,
        /// The payload, as text; `-` reads it from stdin.
        payload: String,
        /// The message key.
        #[arg(long)]
        key: Option<String>,
        /// A header, `NAME=VALUE`; repeat for more.
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// How long to wait for the broker's acknowledgement.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        timeout: f64,
    },
}

#[derive(Debug, Subcommand)]
enum DocsCommand {
    /// Writes the AsyncAPI document (JSON unless --yaml) to stdout or a file.
    Gen {
        /// YAML output.
        #[arg(long, conflicts_with = "json")]
        yaml: bool,
        /// JSON output (the default).
        #[arg(long)]
        json: bool,
        /// Writes to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Serves the docs page (/docs) and the documents (/asyncapi.json, /asyncapi.yaml) until Ctrl-C.
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port to listen on.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Lets the page publish test messages to the service's channels (off by default: never on a
        /// page production users can reach).
        #[arg(long)]
        allow_publish: bool,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

/// A failure of a subcommand: printed as `error: ...`, exit code 1.
type Failure = Box<dyn std::error::Error + Send + Sync>;

impl App {
    /// Runs the service's command line (the process's arguments): `run` (the default), `docs gen`,
    /// `docs serve`, `publish`. See [`cli`](crate::cli). Prints what went wrong and returns a non-zero
    /// exit code on any failure.
    pub async fn run_cli(self) -> ExitCode {
        self.run_cli_from(std::env::args_os()).await
    }

    /// [`run_cli`](Self::run_cli) with these arguments (the first is the program's name).
    pub async fn run_cli_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let info = self.info();
        let about = match &info.description {
            Some(d) => format!("{}: {d}", info.title),
            None => info.title.clone(),
        };
        let program = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| info.title.clone());
        let command = Cli::command().name(program).version(info.version.clone()).about(about);
        let cli = match command
            .try_get_matches_from(args)
            .and_then(|m| Cli::from_arg_matches(&m))
        {
            Ok(cli) => cli,
            Err(e) => {
                // --help and --version print and succeed; a usage mistake prints and exits 2.
                let _ = e.print();
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            }
        };
        let exporting = init_logs(&cli, &self.info().title);
        let code = match self.run_command(cli).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
        drop(exporting);
        code
    }

    async fn run_command(self, cli: Cli) -> Result<(), Failure> {
        if let Some(url) = &cli.broker {
            self.broker().reconnect(url)?;
        }
        let run = Command::Run {
            http: DEFAULT_HTTP.to_owned(),
            allow_publish: false,
            instance_id: None,
        };
        let command = cli.command.unwrap_or(run);
        if let Command::Run {
            instance_id: Some(id), ..
        } = &command
        {
            self.broker().set_instance_id(id.clone());
        }
        match command {
            Command::Run { http, .. } if http == "off" => Ok(self.run().await?),
            Command::Run {
                http, allow_publish, ..
            } => Ok(self.http(http).allow_docs_publish(allow_publish).run().await?),
            Command::Docs {
                command: DocsCommand::Gen { yaml, output, .. },
            } => {
                let doc = self.asyncapi()?;
                let text = if yaml {
                    doc.to_yaml()
                } else {
                    doc.to_json_pretty() + "\n"
                };
                match output {
                    Some(path) => {
                        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
                    }
                    None => {
                        print!("{text}");
                        Ok(())
                    }
                }
            }
            Command::Docs {
                command:
                    DocsCommand::Serve {
                        host,
                        port,
                        allow_publish,
                    },
            } => {
                let docs = Docs::new(&self)?.allow_publish(allow_publish);
                let listener = docs.bind(&format!("{host}:{port}")).await?;
                if let Ok(addr) = listener.local_addr() {
                    eprintln!("docs page: http://{addr}/docs (Ctrl-C stops)");
                }
                Ok(docs.serve_on(listener, ctrl_c()).await?)
            }
            Command::Publish {
                topic,
                payload,
                key,
                headers,
                timeout,
            } => {
                let payload = if payload == "-" {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                } else {
                    payload
                };
                let broker = self.broker();
                let mut publish = broker.publish(payload, &topic);
                if let Some(key) = key {
                    publish = publish.key(key);
                }
                for (name, value) in headers {
                    publish = publish.header(name, value);
                }
                let timeout = Duration::try_from_secs_f64(timeout).map_err(|e| format!("--timeout: {e}"))?;
                let ack = tokio::time::timeout(timeout, publish).await.map_err(|_| {
                    format!(
                        "no acknowledgement from {} within {timeout:?}: is the broker running at that address?",
                        broker.url()
                    )
                })??;
                println!(
                    "published to {} partition {} offset {}",
                    ack.topic, ack.partition, ack.offset
                );
                Ok(())
            }
        }
    }
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Sends the batched traces when the command ends (feature `otlp`).
struct Exporting(#[cfg(feature = "otlp")] Option<crate::otel::Otlp>);

impl Drop for Exporting {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(otlp) = self.0.take() {
            otlp.shutdown();
        }
    }
}

/// Logs to stderr; with feature `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` set, traces to that collector.
fn init_logs(cli: &Cli, #[cfg_attr(not(feature = "otlp"), allow(unused_variables))] service: &str) -> Exporting {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|e| {
        eprintln!("warning: --log-level: {e}; logging at info");
        EnvFilter::new("info")
    });
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match cli.log_format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(lines);
    #[cfg(feature = "otlp")]
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match crate::otel::Otlp::new(service) {
            Ok(otlp) => {
                // An app that set up its own logging and tracing keeps them.
                let _ = registry.with(otlp.layer()).try_init();
                return Exporting(Some(otlp));
            }
            Err(e) => eprintln!("warning: no OTLP export: {e}"),
        }
    }
    // An app that set up its own logging keeps it.
    let _ = registry.try_init();
    Exporting(
        #[cfg(feature = "otlp")]
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn headers_are_name_equals_value() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("=x").is_err());
    }
}
