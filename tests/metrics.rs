//! Prometheus metrics (issue 14): `/metrics` scraped while a known workload runs (successes, handler
//! errors, panics, a payload that does not decode, retries, dead letters), read with the Prometheus
//! project's own Python parser (`prometheus_client.parser`), every family checked; consumer lag checked
//! against the broker's own offsets; health probes through a start and a shutdown.
#![cfg(feature = "prometheus")]

mod common;
#[path = "common/web.rs"]
mod web;

use std::collections::BTreeMap;
use std::time::Duration;

use ferrostream::{AckPolicy, App, Json, OffsetReset, RetryPolicy};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Serialize, Deserialize, JsonSchema)]
struct Job {
    n: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    panic: bool,
}

/// One sample: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the exposition with `prometheus_client.parser` (PyPI; scripts/test.sh installs it).
fn parse(text: &str) -> Vec<Sample> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families as parse\n\
             print(json.dumps([[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejects the exposition ({}):\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, BTreeMap<String, String>, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .map(|(name, labels, value)| Sample { name, labels, value })
        .collect()
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_and_lag_matches_the_brokers_offsets() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let jobs = common::topic(&broker, "metrics-jobs", 1).await;
    let dead = common::topic(&broker, "metrics-dead", 1).await;
    let group = common::unique("metrics");
    broker
        .subscriber(&jobs)
        .name("work")
        .group_id(&group)
        .auto_offset_reset(OffsetReset::Earliest)
        .ack_policy(AckPolicy::NackOnError)
        .retry(
            RetryPolicy::new(3)
                .backoff(Duration::from_millis(1), Duration::from_millis(1))
                .jitter(0.0),
        )
        .dead_letter(&dead)
        .handle(|Json(job): Json<Job>| async move {
            if job.panic {
                panic!("job {} panics", job.n);
            }
            if job.fail {
                return Err(ferrostream::Error::handler(std::io::Error::other("job fails")));
            }
            Ok(())
        });
    let app = App::new(broker.clone())
        .http("127.0.0.1:0")
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let addr = app.http_addr().unwrap();
    let (status, ready) = web::http(addr, "GET", "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    for n in 0..5 {
        broker
            .publish(
                Json(Job {
                    n,
                    fail: false,
                    panic: false,
                }),
                &jobs,
            )
            .await
            .unwrap();
    }
    broker
        .publish(
            Json(Job {
                n: 5,
                fail: true,
                panic: false,
            }),
            &jobs,
        )
        .await
        .unwrap();
    broker
        .publish(
            Json(Job {
                n: 6,
                fail: false,
                panic: true,
            }),
            &jobs,
        )
        .await
        .unwrap();
    broker.publish("not json", &jobs).await.unwrap();
    // 5 acked, 3 dead-lettered, each for good.
    observer.wait_finished("work", 8, common::WAIT).await.unwrap();

    let (status, text) = web::http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let samples = parse(&text);
    let sub = [("subscriber", "work"), ("messaging_destination_name", jobs.as_str())];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = sub.to_vec();
        l.push(extra);
        l
    };
    assert_eq!(
        value(&samples, "messaging_client_consumed_messages_total", &sub),
        12.0,
        "5 + 3 + 3 attempts + 1"
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_processed_messages_total",
            &with(("outcome", "ok"))
        ),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_processed_messages_total",
            &with(("outcome", "handler_error"))
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_processed_messages_total",
            &with(("outcome", "panic"))
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_processed_messages_total",
            &with(("outcome", "decode_error"))
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "ferrostream_settled_messages_total", &with(("settle", "ack"))),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_settled_messages_total",
            &with(("settle", "nack"))
        ),
        4.0,
        "2 retries each"
    );
    assert_eq!(
        value(
            &samples,
            "ferrostream_settled_messages_total",
            &with(("settle", "reject"))
        ),
        3.0
    );
    assert_eq!(value(&samples, "ferrostream_dead_lettered_messages_total", &sub), 3.0);
    assert_eq!(
        value(&samples, "ferrostream_retried_messages_total", &sub),
        0.0,
        "blocking retries"
    );
    assert_eq!(value(&samples, "ferrostream_in_flight_messages", &sub), 0.0);
    assert_eq!(value(&samples, "messaging_process_duration_seconds_count", &sub), 12.0);
    assert_eq!(
        value(
            &samples,
            "messaging_process_duration_seconds_bucket",
            &with(("le", "+Inf"))
        ),
        12.0
    );
    assert!(value(&samples, "messaging_process_duration_seconds_sum", &sub) > 0.0);
    assert!(value(&samples, "ferrostream_rebalances_total", &with(("change", "assigned"))) >= 1.0);
    let system = if common::is_memory() {
        "memory"
    } else if common::is_log() {
        "kafka"
    } else {
        "rabbitmq"
    };
    assert_eq!(
        value(
            &samples,
            "messaging_client_consumed_messages_total",
            &[("subscriber", "work"), ("messaging_system", system)]
        ),
        12.0
    );
    let dlq = [("messaging_destination_name", dead.as_str()), ("outcome", "ok")];
    assert_eq!(value(&samples, "messaging_client_sent_messages_total", &dlq), 3.0);
    let sent = [("messaging_destination_name", jobs.as_str()), ("outcome", "ok")];
    assert_eq!(value(&samples, "messaging_client_sent_messages_total", &sent), 8.0);
    assert_eq!(
        value(
            &samples,
            "messaging_client_operation_duration_seconds_count",
            &[("messaging_destination_name", jobs.as_str())]
        ),
        8.0
    );
    // Nothing carries a payload or a URL.
    assert!(!text.contains("not json") && !text.contains("://"), "{text}");

    if common::is_log() {
        // Commits go out on their cadence (100 ms): scrape until one was acknowledged.
        let deadline = tokio::time::Instant::now() + common::WAIT;
        loop {
            let (_, text) = web::http(addr, "GET", "/metrics", None).await;
            let samples = parse(&text);
            let commits = value(&samples, "ferrostream_commits_total", &with(("outcome", "ok")));
            if commits >= 1.0 {
                assert_eq!(
                    value(&samples, "ferrostream_commit_duration_seconds_count", &sub),
                    commits
                );
                assert_eq!(
                    value(&samples, "ferrostream_commits_total", &with(("outcome", "error"))),
                    0.0
                );
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no commit counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    app.shutdown().await.unwrap();

    // A stopped consumer's lag is what was published since.
    for n in 0..4 {
        broker
            .publish(
                Json(Job {
                    n,
                    fail: false,
                    panic: false,
                }),
                &jobs,
            )
            .await
            .unwrap();
    }
    let samples = parse(&ferrostream::prometheus::render(&broker).await);
    if common::is_log() {
        let lag = value(&samples, "ferrostream_consumer_lag_messages", &with(("partition", "0")));
        assert_eq!(lag, 4.0);
        let end = broker.end_offsets(&jobs).await.unwrap()[&0];
        let committed = broker.committed_offsets(&group, &jobs).await.unwrap()[&0];
        assert_eq!(lag, (end - committed) as f64, "the broker's own watermarks");
    } else {
        assert_eq!(value(&samples, "ferrostream_queue_depth_messages", &sub), 4.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_say_live_then_ready_once_consuming_and_not_ready_once_stopping() {
    let broker = common::broker();
    let topic = common::topic(&broker, "probes", 1).await;
    let (entered, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    broker
        .subscriber(&topic)
        .name("probed")
        .group_id(common::unique("probes"))
        .auto_offset_reset(OffsetReset::Earliest)
        .auto_commit(false)
        .handle(move |_: String| {
            let entered = entered.clone();
            let held = held.clone();
            async move {
                let _ = entered.send(());
                held.notified().await;
            }
        });
    let app = App::new(broker.clone())
        .http("127.0.0.1:0")
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let addr = app.http_addr().unwrap();
    let (status, live) = web::http(addr, "GET", "/health/live", None).await;
    assert_eq!((status, live.as_str()), (200, r#"{"live":true}"#));
    let (status, ready) = web::http(addr, "GET", "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["subscribers"], serde_json::json!(["probed"]));
    // While it drains a handler that is still running, it is no longer ready.
    broker.publish("hold", &topic).await.unwrap();
    tokio::time::timeout(common::WAIT, entered_rx.recv()).await.unwrap();
    let stopping = tokio::spawn(app.shutdown());
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (status, body) = web::http(addr, "GET", "/health/ready", None).await;
        if status == 503 {
            assert!(body.contains("shutting down"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready while stopping: {body}"
        );
        tokio::task::yield_now().await;
    }
    release.notify_one();
    stopping.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_fails_the_start_at_once_naming_it() {
    let broker = common::broker();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = App::new(broker)
        .http(addr.clone())
        .start()
        .await
        .err()
        .expect("the start fails");
    assert!(matches!(err, ferrostream::StartError::Http { .. }), "{err}");
    assert!(
        err.to_string().contains(&addr) && err.to_string().contains("--http"),
        "{err}"
    );
}
