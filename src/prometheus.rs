//! Prometheus metrics of a broker's subscribers and publishes (feature `prometheus`), in the Prometheus
//! text format, served at `/metrics` by the service's HTTP server ([`App::http`](crate::App::http),
//! `run --http`).
//!
//! Names and labels follow OpenTelemetry's messaging semantic conventions mapped to Prometheus naming;
//! what ferrostream adds is prefixed `ferrostream_`. Every subscriber metric has the labels `subscriber`,
//! `messaging_system` (`kafka`, `rabbitmq`, `memory`), `messaging_destination_name` (the topic or queue)
//! and `messaging_consumer_group_name` (empty without a group); a label value is always a name the code
//! declared, never a payload, a key or a URL (no credentials, bounded cardinality).
//!
//! | family | type | extra labels | what |
//! |---|---|---|---|
//! | `messaging_client_consumed_messages_total` | counter | | messages handed to the handler (a redelivery counts again) |
//! | `messaging_process_duration_seconds` | histogram | | handler call duration (its result's publish included) |
//! | `ferrostream_processed_messages_total` | counter | `outcome`: `ok`, `handler_error`, `decode_error`, `panic` | handler calls' outcomes, per message |
//! | `ferrostream_settled_messages_total` | counter | `settle`: `ack`, `nack`, `reject` | settles sent to the broker |
//! | `ferrostream_dead_lettered_messages_total` | counter | | rejects published to the dead-letter topic |
//! | `ferrostream_retried_messages_total` | counter | | failures published to the retry topic |
//! | `ferrostream_in_flight_messages` | gauge | | messages in handler calls now |
//! | `ferrostream_commits_total` | counter | `outcome`: `ok`, `error` | commits (log brokers) |
//! | `ferrostream_commit_duration_seconds` | histogram | | from a commit's request to the broker's answer |
//! | `ferrostream_rebalances_total` | counter | `change`: `assigned`, `revoked` | partition assignments and revocations |
//! | `ferrostream_consumer_lag_messages` | gauge | `partition` | log end offset minus the group's committed offset (Kafka, memory) |
//! | `ferrostream_consumer_lag_position_messages` | gauge | `partition` | log end offset minus this consumer's position (partitions it owns) |
//! | `ferrostream_queue_depth_messages` | gauge | | messages ready in the subscriber's queue (RabbitMQ) |
//! | `messaging_client_sent_messages_total` | counter | `messaging_destination_name`, `outcome`: `ok`, `error` | publishes acknowledged or failed (replies as `(reply)`) |
//! | `messaging_client_operation_duration_seconds` | histogram | `messaging_operation_name="send"`, `messaging_destination_name` | from a publish to the broker's acknowledgement |
//!
//! The hot path pays only relaxed atomic increments on counters the engine keeps per subscriber anyway
//! (no label lookup per message); prometheus-client (the Prometheus project's Rust client) encodes them
//! at scrape time, and lag and queue depth are asked of the broker then.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = ferrostream::Broker::new("memory://")?;
//! broker.publish("hello", "orders").await?;
//! let text = ferrostream::prometheus::render(&broker).await;
//! assert!(text.contains(r#"messaging_client_sent_messages_total{messaging_system="memory",messaging_destination_name="orders",outcome="ok"} 1"#));
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::Broker;
use crate::metrics::{Counters, HistogramSnapshot, SubscriberLabels, SubscriberMetrics, system_of};

/// The `Content-Type` of the text it renders.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape waits for the broker's offsets or queue depths before leaving them out.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

type Labels = Vec<(&'static str, String)>;

/// One subscriber as a scrape sees it.
#[derive(Debug)]
struct SubscriberSample {
    labels: Labels,
    counts: SubscriberMetrics,
    process: HistogramSnapshot,
    commit: HistogramSnapshot,
    /// Per partition: lag from the committed offset, and from this consumer's position.
    lag: Vec<(i32, i64, Option<i64>)>,
    queue_depth: Option<u64>,
}

#[derive(Debug)]
struct Sample {
    system: &'static str,
    subscribers: Vec<SubscriberSample>,
    publishes: Vec<(String, u64, u64, HistogramSnapshot)>,
}

/// The broker's metrics in the Prometheus text format (what `/metrics` serves).
pub async fn render(broker: &Broker) -> String {
    let sample = sample(broker).await;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sample));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::warn!(error = %e, "could not encode the metrics");
    }
    text
}

async fn sample(broker: &Broker) -> Sample {
    let system = system_of(broker.url());
    let mut subscribers = Vec::new();
    for (name, counters) in broker.metrics().all() {
        // The broker's own reply consumer is not the service's.
        if name.starts_with(crate::request::REPLY_PREFIX) {
            continue;
        }
        subscribers.push(subscriber(broker, name, &counters).await);
    }
    let publishes = broker
        .metrics()
        .publishes()
        .all()
        .into_iter()
        .map(|(dest, c)| {
            (
                dest,
                c.sent.load(std::sync::atomic::Ordering::Relaxed),
                c.failed.load(std::sync::atomic::Ordering::Relaxed),
                c.latency.snapshot(),
            )
        })
        .collect();
    Sample {
        system,
        subscribers,
        publishes,
    }
}

async fn subscriber(broker: &Broker, name: String, counters: &Arc<Counters>) -> SubscriberSample {
    let declared = counters.labels.get().cloned().unwrap_or(SubscriberLabels {
        system: system_of(broker.url()),
        topic: String::new(),
        group: None,
    });
    let mut lag = Vec::new();
    let mut queue_depth = None;
    match (&declared.group, declared.system) {
        (Some(group), "kafka" | "memory") => {
            let offsets = tokio::time::timeout(ADMIN_TIMEOUT, async {
                let end = broker.end_offsets(&declared.topic).await?;
                let committed = broker.committed_offsets(group, &declared.topic).await?;
                Ok::<_, crate::AdminError>((end, committed))
            })
            .await;
            match offsets {
                Ok(Ok((end, committed))) => {
                    let positions = counters.positions();
                    for (partition, end) in end {
                        // No commit yet: the whole log is ahead of the group.
                        let from_committed = end - committed.get(&partition).copied().unwrap_or(0).max(0);
                        let from_position = positions
                            .iter()
                            .find(|(tp, _)| tp.partition == partition)
                            .and_then(|(_, p)| p.position)
                            .map(|p| end - p);
                        lag.push((partition, from_committed.max(0), from_position.map(|l| l.max(0))));
                    }
                }
                Ok(Err(e)) => tracing::debug!(subscriber = %name, error = %e, "no consumer lag this scrape"),
                Err(_) => tracing::debug!(subscriber = %name, "no consumer lag this scrape: the broker is slow"),
            }
        }
        (_, "rabbitmq") => {
            if let Ok(Ok(depth)) = tokio::time::timeout(ADMIN_TIMEOUT, broker.queue_depth(&declared.topic)).await {
                queue_depth = Some(depth);
            }
        }
        _ => {}
    }
    SubscriberSample {
        labels: vec![
            ("subscriber", name),
            ("messaging_system", declared.system.to_owned()),
            ("messaging_destination_name", declared.topic.clone()),
            (
                "messaging_consumer_group_name",
                declared.group.clone().unwrap_or_default(),
            ),
        ],
        counts: counters.snapshot(),
        process: counters.process.snapshot(),
        commit: counters.commit_latency.snapshot(),
        lag,
        queue_depth,
    }
}

fn with(labels: &Labels, extra: &[(&'static str, &str)]) -> Labels {
    let mut l = labels.clone();
    l.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    l
}

/// One family: its descriptor, then each labelled sample.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram snapshot as prometheus-client encodes one.
#[derive(Debug)]
struct Hist(HistogramSnapshot);

impl EncodeMetric for Hist {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_seconds,
            self.0.count,
            &self.0.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Sample {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let subs = &self.subscribers;
        let counter = |v: u64| ConstCounter::new(v);
        family(
            &mut e,
            "messaging_client_consumed_messages",
            "Messages handed to the subscriber's handler (a redelivered message counts again).",
            None,
            MetricType::Counter,
            subs.iter().map(|s| (s.labels.clone(), counter(s.counts.received))),
        )?;
        family(
            &mut e,
            "messaging_process_duration",
            "Duration of the subscriber's handler calls, the publish of their results included.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            subs.iter().map(|s| (s.labels.clone(), Hist(s.process.clone()))),
        )?;
        family(
            &mut e,
            "ferrostream_processed_messages",
            "Handler outcomes per message: ok (returned or interrupted), handler_error, decode_error, panic.",
            None,
            MetricType::Counter,
            subs.iter().flat_map(|s| {
                let c = &s.counts;
                [
                    ("ok", c.succeeded),
                    ("handler_error", c.handler_errors),
                    ("decode_error", c.decode_errors),
                    ("panic", c.panics),
                ]
                .map(|(o, v)| (with(&s.labels, &[("outcome", o)]), counter(v)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_settled_messages",
            "Settles sent to the broker: ack, nack (delivered again), reject.",
            None,
            MetricType::Counter,
            subs.iter().flat_map(|s| {
                let c = &s.counts;
                [("ack", c.acks), ("nack", c.nacks), ("reject", c.rejects)]
                    .map(|(o, v)| (with(&s.labels, &[("settle", o)]), counter(v)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_dead_lettered_messages",
            "Rejected messages published to the dead-letter topic.",
            None,
            MetricType::Counter,
            subs.iter().map(|s| (s.labels.clone(), counter(s.counts.dead_lettered))),
        )?;
        family(
            &mut e,
            "ferrostream_retried_messages",
            "Failed messages published to the retry topic.",
            None,
            MetricType::Counter,
            subs.iter().map(|s| (s.labels.clone(), counter(s.counts.retries))),
        )?;
        family(
            &mut e,
            "ferrostream_in_flight_messages",
            "Messages in handler calls now.",
            None,
            MetricType::Gauge,
            subs.iter().map(|s| {
                let n = s.counts.received.saturating_sub(s.counts.handled);
                (s.labels.clone(), ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_commits",
            "Offset commits the broker acknowledged (ok) or failed (error; retried).",
            None,
            MetricType::Counter,
            subs.iter().flat_map(|s| {
                [("ok", s.counts.commits), ("error", s.counts.commit_errors)]
                    .map(|(o, v)| (with(&s.labels, &[("outcome", o)]), counter(v)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_commit_duration",
            "From an offset commit's request to the broker's answer.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            subs.iter()
                .filter(|s| s.commit.count > 0)
                .map(|s| (s.labels.clone(), Hist(s.commit.clone()))),
        )?;
        family(
            &mut e,
            "ferrostream_rebalances",
            "Partition assignments and revocations the subscriber went through.",
            None,
            MetricType::Counter,
            subs.iter().flat_map(|s| {
                [("assigned", s.counts.assignments), ("revoked", s.counts.revocations)]
                    .map(|(o, v)| (with(&s.labels, &[("change", o)]), counter(v)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_consumer_lag_messages",
            "Log end offset minus the group's committed offset, per partition.",
            None,
            MetricType::Gauge,
            subs.iter().flat_map(|s| {
                s.lag
                    .iter()
                    .map(|(p, lag, _)| (with(&s.labels, &[("partition", &p.to_string())]), ConstGauge::new(*lag)))
            }),
        )?;
        family(
            &mut e,
            "ferrostream_consumer_lag_position_messages",
            "Log end offset minus this consumer's position, per partition it owns.",
            None,
            MetricType::Gauge,
            subs.iter().flat_map(|s| {
                s.lag.iter().filter_map(|(p, _, lag)| {
                    lag.map(|lag| (with(&s.labels, &[("partition", &p.to_string())]), ConstGauge::new(lag)))
                })
            }),
        )?;
        family(
            &mut e,
            "ferrostream_queue_depth_messages",
            "Messages ready in the subscriber's queue (RabbitMQ).",
            None,
            MetricType::Gauge,
            subs.iter().filter_map(|s| {
                s.queue_depth
                    .map(|d| (s.labels.clone(), ConstGauge::new(i64::try_from(d).unwrap_or(i64::MAX))))
            }),
        )?;
        let system = self.system.to_owned();
        let dest = |d: &str| -> Labels {
            vec![
                ("messaging_system", system.clone()),
                ("messaging_destination_name", d.to_owned()),
            ]
        };
        family(
            &mut e,
            "messaging_client_sent_messages",
            "Publishes the broker acknowledged (ok) or that failed (error).",
            None,
            MetricType::Counter,
            self.publishes.iter().flat_map(|(d, sent, failed, _)| {
                [("ok", *sent), ("error", *failed)].map(|(o, v)| {
                    let mut l = dest(d);
                    l.push(("outcome", o.to_owned()));
                    (l, counter(v))
                })
            }),
        )?;
        family(
            &mut e,
            "messaging_client_operation_duration",
            "From a publish to the broker's acknowledgement.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            self.publishes.iter().map(|(d, _, _, h)| {
                let mut l = vec![("messaging_operation_name", "send".to_owned())];
                l.extend(dest(d));
                (l, Hist(h.clone()))
            }),
        )?;
        Ok(())
    }
}
