//! The command line a service gains with `App::run_cli`, run as a process: the `service` example built
//! with this test's features, against the test broker (`FERROSTREAM_TEST_BROKER`, default memory://).
#![cfg(feature = "cli")]

mod common;
#[path = "common/web.rs"]
mod web;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// The example binary, built once per run with the features this test was built with.
fn service() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut features = vec!["cli"];
        if cfg!(feature = "kafka") {
            features.push("kafka");
        }
        if cfg!(feature = "amqp") {
            features.push("amqp");
        }
        if cfg!(feature = "otel") {
            features.push("otel");
        }
        if cfg!(feature = "otlp") {
            features.push("otlp");
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "service", "--features"])
            .arg(features.join(","))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the service example builds");
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        target.join("debug/examples/service")
    })
}

fn run(args: &[&str]) -> Output {
    Command::new(service())
        .args(args)
        .env_remove("FERROSTREAM_BROKER")
        .env_remove("RUST_LOG")
        .output()
        .expect("the service runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_subcommand_has_help_and_the_version_is_the_apps() {
    let help = run(&["--help"]);
    assert!(help.status.success());
    let out = text(&help.stdout);
    assert!(
        out.starts_with("shop: Bills orders and answers price requests."),
        "{out}"
    );
    for sub in ["run", "docs", "publish"] {
        assert!(out.contains(sub), "{sub} missing from:\n{out}");
    }
    for (args, expect) in [
        (&["run", "--help"][..], "--http"),
        (&["docs", "gen", "--help"], "--yaml"),
        (&["docs", "serve", "--help"], "--allow-publish"),
        (&["publish", "--help"], "--header"),
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}");
        assert!(text(&out.stdout).contains(expect), "{args:?}: {}", text(&out.stdout));
    }
    let version = run(&["--version"]);
    assert_eq!(
        text(&version.stdout).trim(),
        format!("service {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn mistakes_exit_non_zero_and_say_what_is_wrong() {
    let unknown = run(&["frobnicate"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("unrecognized subcommand 'frobnicate'"));

    let bad_url = run(&["--broker", "nosuch://x", "docs", "gen"]);
    assert_eq!(bad_url.status.code(), Some(1));
    let err = text(&bad_url.stderr);
    assert!(
        err.contains("unknown scheme `nosuch://`") && err.contains("memory://"),
        "{err}"
    );

    let bad_header = run(&["publish", "t", "x", "--header", "novalue"]);
    assert_eq!(bad_header.status.code(), Some(2));
    assert!(text(&bad_header.stderr).contains("`novalue` is not NAME=VALUE"));

    // A port that is taken: the error names it, at once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let started = std::time::Instant::now();
    let serve = run(&["docs", "serve", "--port", &port]);
    assert_eq!(serve.status.code(), Some(1));
    let err = text(&serve.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")) && err.contains("--port"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn docs_gen_writes_a_valid_document_as_json_or_yaml() {
    let url = common::broker_url();
    let json = run(&["--broker", &url, "docs", "gen"]);
    assert!(json.status.success(), "{}", text(&json.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["info"]["title"], "shop");
    assert_eq!(doc["operations"]["billing"]["action"], "receive");
    assert!(!text(&json.stdout).contains("guest:guest"), "no credentials");

    let dir = web::artifacts_dir();
    let yaml_file = dir.join(format!("service-{}.yaml", std::process::id()));
    let yaml = run(&[
        "--broker",
        &url,
        "docs",
        "gen",
        "--yaml",
        "--output",
        yaml_file.to_str().unwrap(),
    ]);
    assert!(yaml.status.success(), "{}", text(&yaml.stderr));
    assert!(yaml.stdout.is_empty(), "written to the file, not stdout");
    let from_yaml: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(&yaml_file).unwrap()).unwrap();
    assert_eq!(from_yaml, doc);

    let json_file = dir.join(format!("service-{}.json", std::process::id()));
    std::fs::write(&json_file, &json.stdout).unwrap();
    web::assert_valid_asyncapi(&[&json_file, &yaml_file]);
}

/// A child process whose stderr lines are readable as they come.
struct Child {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Child {
    fn spawn(args: &[&str]) -> Child {
        let mut child = tokio::process::Command::new(service())
            .args(args)
            .env_remove("FERROSTREAM_BROKER")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the service starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        Child { child, lines }
    }

    /// The first line that `matches`, within the deadline; every line seen on failure.
    async fn wait_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + common::WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if matches(&line) => return line,
                Ok(Some(line)) => seen.push(line),
                Ok(None) => panic!("the service exited before {what}:\n{}", seen.join("\n")),
                Err(_) => panic!("no {what} within {:?}:\n{}", common::WAIT, seen.join("\n")),
            }
        }
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running").to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("a graceful shutdown within 30 s")
            .unwrap()
    }
}

/// The services these tests run share the example's group and queues: on a real broker two of them at
/// once would split the orders between them, so they take turns.
static SERVICE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_consumes_until_sigterm_and_serves_its_docs_and_publish_publishes() {
    let _turn = SERVICE.lock().await;
    let url = common::broker_url();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut service = Child::spawn(&[
        "--broker",
        &url,
        "--log-format",
        "json",
        "run",
        "--http",
        &http,
        "--allow-publish",
    ]);
    service
        .wait_line("`app started` log line", |l| l.contains("app started"))
        .await;
    // The docs page is served while it runs.
    let addr = http.parse().unwrap();
    let (status, doc) = web::http(addr, "GET", "/asyncapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc.contains("shop.orders"));

    let id = std::process::id() as u64 * 1000 + u64::from(port % 1000);
    let order = format!(r#"{{"id": {id}, "items": [{{"sku": "tea", "quantity": 2}}]}}"#);
    if common::is_memory() {
        // Another process cannot reach an in-memory broker: publish through the running service's page.
        let body = serde_json::json!({ "channel": "shop.orders", "payload": order }).to_string();
        let (status, answer) = web::http(addr, "POST", "/docs/publish", Some(&body)).await;
        assert_eq!(status, 200, "{answer}");
    } else {
        // A second process publishes through the real broker.
        let publish = tokio::task::spawn_blocking(move || {
            run(&[
                "--broker",
                &url,
                "publish",
                "shop.orders",
                &order,
                "--key",
                "k",
                "--header",
                "source=cli-test",
            ])
        })
        .await
        .unwrap();
        assert!(publish.status.success(), "{}", text(&publish.stderr));
        assert!(text(&publish.stdout).starts_with("published to shop.orders partition "));
    }
    // Billed (the JSON log line carries the order), then booked from shop.invoices.
    let billed = service
        .wait_line("billing of the order", |l| {
            l.contains("\"billed\"") && l.contains(&format!("\"order\":{id}"))
        })
        .await;
    let line: serde_json::Value = serde_json::from_str(&billed).expect("--log-format json: one JSON object per line");
    assert_eq!(line["fields"]["amount_cents"], 600);
    service
        .wait_line("booking of its invoice", |l| {
            l.contains("\"booked\"") && l.contains(&format!("\"order\":{id}"))
        })
        .await;
    let status = service.terminate().await;
    assert!(status.success(), "a SIGTERM is a graceful stop: {status}");
}

/// `run --instance-id` names the instance for Kafka static membership: each subscriber with a group joins
/// as `<id>-<subscriber name>`. (What static membership does is proved on Kafka by kafka_crash's restart of
/// a static member; a static member of the example's shared group would hold its partitions there for a
/// session after it stops, so this runs on memory://.)
#[tokio::test(flavor = "multi_thread")]
async fn run_instance_id_gives_each_grouped_subscriber_its_static_member_name() {
    if !common::is_memory() {
        return;
    }
    let _turn = SERVICE.lock().await;
    let mut service = Child::spawn(&[
        "--broker",
        "memory://",
        "--log-format",
        "json",
        "run",
        "--http",
        "off",
        "--instance-id",
        "pod-7",
    ]);
    let line = service
        .wait_line("a subscriber starting as a static member", |l| {
            l.contains("starting subscriber") && l.contains("group_instance_id")
        })
        .await;
    let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let id = line["fields"]["group_instance_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("pod-7-"), "{line}");
    // A signal during the start interrupts it (a failure exit): stop it once it runs.
    service
        .wait_line("`app started` log line", |l| l.contains("app started"))
        .await;
    assert!(service.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_on_memory_prints_the_acknowledgement() {
    if !common::is_memory() {
        return; // the real-broker publish is exercised by `run_consumes_until_sigterm...`
    }
    let out = run(&["publish", "shop.orders", "{}", "--key", "k", "--header", "a=b"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "published to shop.orders partition 0 offset 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docs_serve_serves_the_page_until_interrupted() {
    let port = free_port();
    let mut docs = Child::spawn(&["docs", "serve", "--port", &port.to_string()]);
    docs.wait_line("the docs URL", |l| l.contains(&format!("http://127.0.0.1:{port}/docs")))
        .await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, page) = web::http(addr, "GET", "/docs", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>") && page.contains("\"title\":\"shop\""));
    let (status, _) = web::http(
        addr,
        "POST",
        "/docs/publish",
        Some(r#"{"channel": "shop.orders", "payload": "{}"}"#),
    )
    .await;
    assert_eq!(status, 403, "no publishing without --allow-publish");
    let pid = docs.child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(10), docs.child.wait())
        .await
        .expect("Ctrl-C stops it")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// A real Prometheus server (Debian's `prometheus`) scrapes the running service's `/metrics`, and a
/// query over its HTTP API returns the consumed-messages series of the subscriber that handled an order.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_server_scrapes_the_running_service() {
    let _turn = SERVICE.lock().await;
    let url = common::broker_url();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut service = Child::spawn(&[
        "--broker",
        &url,
        "--log-format",
        "json",
        "run",
        "--http",
        &http,
        "--allow-publish",
    ]);
    service
        .wait_line("`app started` log line", |l| l.contains("app started"))
        .await;
    let addr: std::net::SocketAddr = http.parse().unwrap();
    let id = 7_000_000 + u64::from(port);
    let order = format!(r#"{{"id": {id}, "items": [{{"sku": "tea", "quantity": 1}}]}}"#);
    let body = serde_json::json!({ "channel": "shop.orders", "payload": order }).to_string();
    let (status, answer) = web::http(addr, "POST", "/docs/publish", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    service
        .wait_line("billing of the order", |l| {
            l.contains("\"billed\"") && l.contains(&format!("\"order\":{id}"))
        })
        .await;

    let dir = web::artifacts_dir().join(format!("prometheus-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shop\n    static_configs:\n      - targets: ['{http}']\n"
        ),
    )
    .unwrap();
    let web_port = free_port();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus runs (scripts/test-tools.sh installs it)");
    let api: std::net::SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    let query = "/api/v1/query?query=messaging_client_consumed_messages_total%7Bsubscriber%3D%22billing%22%7D";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let value = loop {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(api)).await
        {
            drop(stream);
            let (status, body) = web::http(api, "GET", query, None).await;
            if status == 200 {
                let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
                if let Some(series) = answer["data"]["result"].as_array().and_then(|r| r.first()) {
                    assert_eq!(series["metric"]["job"], "shop");
                    assert_eq!(series["metric"]["messaging_destination_name"], "shop.orders");
                    break series["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never returned the series"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(value >= 1.0, "{value}");
    prometheus.kill().await.unwrap();
    let status = service.terminate().await;
    assert!(status.success(), "{status}");
}

/// With feature `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` set, `run` exports its traces with OTLP over
/// HTTP: a stand-in collector receives `POST /v1/traces` (protobuf) once the service handled an order
/// and shut down (the exporter sends what is batched at the end).
#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread")]
async fn run_exports_its_traces_to_an_otlp_collector() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _turn = SERVICE.lock().await;
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (got, mut requests) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = collector.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut len = 0;
                // The request head (and some body): enough to see what was sent.
                while let Ok(n) = conn.read(&mut buf[len..]).await {
                    if n == 0 {
                        break;
                    }
                    len += n;
                    let text = String::from_utf8_lossy(&buf[..len]);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let expected: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= expected {
                            let _ = got.send(format!("{head}\nbody bytes: {}", body.len()));
                            let _ = conn
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            break;
                        }
                    }
                }
            });
        }
    });
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(service())
        .args(["run", "--http", &http, "--allow-publish"])
        .env_remove("FERROSTREAM_BROKER")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::unbounded_channel();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            let _ = tx.send(line);
        }
    });
    let mut service = Child { child, lines };
    service
        .wait_line("`app started` log line", |l| l.contains("app started"))
        .await;
    let body = serde_json::json!({ "channel": "shop.orders", "payload": r#"{"id": 1, "items": []}"# }).to_string();
    let (status, answer) = web::http(http.parse().unwrap(), "POST", "/docs/publish", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    service
        .wait_line("billing of the order", |l| l.contains("billed"))
        .await;
    let status = service.terminate().await;
    assert!(status.success(), "{status}");
    let request = tokio::time::timeout(common::WAIT, requests.recv())
        .await
        .expect("the collector receives the traces")
        .unwrap();
    assert!(request.starts_with("POST /v1/traces HTTP/1.1"), "{request}");
    assert!(
        request
            .to_ascii_lowercase()
            .contains("content-type: application/x-protobuf"),
        "{request}"
    );
    assert!(!request.ends_with("body bytes: 0"), "{request}");
}
