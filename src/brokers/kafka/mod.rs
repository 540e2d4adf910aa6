//! The Kafka backend, on rdkafka with its vendored librdkafka (feature `kafka`).
//!
//! Defaults chosen deliberately (override any of them with [`KafkaConfig::set`]):
//!
//! | setting | value | why |
//! |---|---|---|
//! | `enable.auto.commit` | `false` | ferrostream commits itself, only past settled offsets (SPEC 3.1) |
//! | `enable.auto.offset.store` | `false` | likewise |
//! | `session.timeout.ms` | `10000` | a dead member's partitions move in ~10 s, not 45 s |
//! | `heartbeat.interval.ms` | `1000` | must stay well below the session timeout |
//! | `fetch.queue.backoff.ms` | `10` | librdkafka's default (1 s) caused random ~1 s stalls |
//! | `enable.idempotence` | `true` | no duplicates from producer retries |
//! | `acks` | `all` | `publish` resolves once every in-sync replica has the record |
//! | `linger.ms` | `1` | concurrent publishes share produce requests; a publish that is alone (nothing else in flight) does not wait it: the producer is flushed for it (for at most one linger period and 10 ms), so an application that awaits each publish gets the broker's round trip, not the linger; `0` turns batching and this off |
//! | `group.instance.id` | unset; `<id>-<subscriber>` under [`Broker::with_instance_id`](crate::Broker::with_instance_id) | static membership: a restarted member takes its partitions back at once |
//! | `message.timeout.ms` | `30000` | a publish the broker has not acknowledged in 30 s fails with `PublishError::Timeout` (librdkafka's default waits 5 minutes, e.g. for a broker that is down) |
//!
//! Memory on a backlog: ferrostream pauses a partition once `max_buffered` records wait in its queue, but
//! librdkafka prefetches on its own too (`queued.min.messages`, default 100000 per partition, and up to
//! `max.partition.fetch.bytes` per fetch). Lower those to bound memory harder:
//! `kafka://host:9092?consumer.queued.min.messages=1000`.

mod commit_queue;
mod consumer;
mod error_code;
mod fetch_queue;
mod lone;
mod quiet;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

pub(crate) use consumer::KafkaConsumer;
use error_code::{client_error, code_error, kafka_error};
use quiet::QuietContext;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use super::{Backend, LogAdmin, spawn_log};
use crate::engine::Launch;
use crate::error::{AdminError, BrokerError, ConfigError, PublishError, StartError};
use crate::log::{MAX_MESSAGE_BYTES, check_topic_name, record_size};
use crate::transport::{Meter, Outgoing, PublishAck, Publisher, no_exchanges};

/// How long a subscriber's start waits for a broker to answer at all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long admin and metadata calls may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a record may wait in the producer queue before `publish` fails.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// The default delivery timeout of a publish (`message.timeout.ms`), in milliseconds.
const DELIVERY_TIMEOUT_MS: &str = "30000";
/// The producer's default `linger.ms` (a publish that is alone does not wait it: see [`lone`]).
const LINGER_MS: &str = "1";

/// Kafka client settings: bootstrap servers plus any librdkafka setting, passed through as is.
///
/// ```
/// use ferrostream::kafka::KafkaConfig;
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .set("security.protocol", "sasl_ssl")
///     .set("sasl.mechanisms", "PLAIN")
///     .set_consumer("max.poll.interval.ms", "600000");
/// assert_eq!(config.bootstrap_servers(), "127.0.0.1:9092");
/// // Its `Debug` output never shows a credential.
/// let secret = KafkaConfig::new("h:9092").set("sasl.password", "hunter2");
/// assert!(!format!("{secret:?}").contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    bootstrap: String,
    common: BTreeMap<String, String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter()
                .map(|(k, v)| {
                    let v = if crate::redact::is_secret(k) {
                        "***".to_owned()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect()
        };
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("common", &shown(&self.common))
            .field("consumer", &shown(&self.consumer))
            .field("producer", &shown(&self.producer))
            .finish()
    }
}

impl KafkaConfig {
    /// Settings for these bootstrap servers (`host:port[,host:port]`).
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap: bootstrap_servers.into(),
            common: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }

    /// Parses `kafka://host:port[,host:port][?setting=value&...]`. A setting applies to every client, or
    /// to consumers only with a `consumer.` prefix, or to the producer only with a `producer.` prefix.
    pub(crate) fn from_url(url: &str, rest: &str) -> Result<Self, ConfigError> {
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        if hosts.is_empty() {
            return Err(ConfigError::InvalidUrl {
                url: crate::redact::url(url),
                reason: "expected kafka://host:port[,host:port]".to_owned(),
            });
        }
        for h in hosts.split(',') {
            let reason = match h.rsplit_once(':') {
                None => format!("`{h}` has no port: write host:port, e.g. 127.0.0.1:9092"),
                Some(("", _)) => format!("`{h}` has no host: write host:port, e.g. 127.0.0.1:9092"),
                Some((_, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => continue,
                Some((_, port)) => format!("the port `{port}` of `{h}` is not a number from 1 to 65535"),
            };
            return Err(ConfigError::InvalidUrl {
                url: crate::redact::url(url),
                reason,
            });
        }
        let mut config = KafkaConfig::new(hosts);
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(ConfigError::InvalidUrl {
                    url: crate::redact::url(url),
                    reason: format!("`{kv}` is not a setting=value pair"),
                });
            };
            config = match (k.strip_prefix("consumer."), k.strip_prefix("producer.")) {
                (Some(k), _) => config.set_consumer(k, v),
                (_, Some(k)) => config.set_producer(k, v),
                _ => config.set(k, v),
            };
        }
        Ok(config)
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Sets a librdkafka setting for every client (consumers, producer, admin).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.common.insert(key.into(), value.into());
        self
    }

    /// Sets a librdkafka setting for consumers only.
    pub fn set_consumer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer.insert(key.into(), value.into());
        self
    }

    /// Sets a librdkafka setting for the producer only.
    pub fn set_producer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer.insert(key.into(), value.into());
        self
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.common {
            c.set(k, v);
        }
        c
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", LINGER_MS)
            .set("message.timeout.ms", DELIVERY_TIMEOUT_MS);
        for (k, v) in self.common.iter().chain(&self.producer) {
            c.set(k, v);
        }
        c
    }

    pub(crate) fn consumer_config(
        &self,
        group: &str,
        instance: Option<&str>,
        reset: crate::OffsetReset,
    ) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.queue.backoff.ms", "10")
            .set(
                "auto.offset.reset",
                match reset {
                    crate::OffsetReset::Earliest => "earliest",
                    crate::OffsetReset::Latest => "latest",
                },
            );
        if let Some(id) = instance {
            c.set("group.instance.id", id);
        }
        for (k, v) in self.common.iter().chain(&self.consumer) {
            c.set(k, v);
        }
        c
    }
}

fn admin_error(op: &'static str, e: KafkaError) -> AdminError {
    AdminError::Broker(kafka_error(op, e))
}

/// The Kafka side of a [`Broker`](crate::Broker): one shared producer plus admin helpers.
#[derive(Clone)]
pub(crate) struct KafkaBackend {
    config: Arc<KafkaConfig>,
    producer: Arc<FutureProducer<QuietContext>>,
    /// Sends a publish that is alone without waiting out the linger (`None` at `linger.ms=0`).
    lone: Option<Arc<lone::Lone>>,
    /// The producer's `message.max.bytes`, to say in a `TooLarge` error.
    max_message_bytes: usize,
    /// A broker answered a probe once: later subscribers of this backend start without one.
    reached: Arc<std::sync::atomic::AtomicBool>,
    /// How long a publish may wait for the broker's acknowledgement (`message.timeout.ms`).
    delivery_timeout: Duration,
}

impl KafkaBackend {
    pub(crate) fn new(config: KafkaConfig) -> Result<Self, ConfigError> {
        // The producer's settings as librdkafka gets them: defaults, then the common, then the producer's.
        let settings = config.producer_config();
        let producer: FutureProducer<QuietContext> = settings
            .create_with_context(QuietContext::new("producer"))
            .map_err(|e| ConfigError::InvalidUrl {
                url: format!("kafka://{}", config.bootstrap),
                reason: format!("cannot create the Kafka producer: {e}"),
            })?;
        let delivery_timeout = settings
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map_or(PUBLISH_TIMEOUT, Duration::from_millis);
        let max_message_bytes = settings
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_MESSAGE_BYTES);
        // `queue.buffering.max.ms` is librdkafka's older name for `linger.ms`, which is always set.
        let linger = settings
            .get("queue.buffering.max.ms")
            .or_else(|| settings.get("linger.ms"))
            .and_then(|ms| ms.parse::<f64>().ok())
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
            .unwrap_or_default();
        let producer = Arc::new(producer);
        Ok(KafkaBackend {
            config: Arc::new(config),
            lone: lone::Lone::start(&producer, linger).map(Arc::new),
            producer,
            max_message_bytes,
            delivery_timeout,
            reached: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// Hands the record to librdkafka now and returns what waits for the broker's acknowledgement: a small
    /// future (the delivery report's channel), not one that carries the record. A full producer queue
    /// waits in [`Self::publish_when_queued`] instead.
    fn enqueue(&self, out: Outgoing, meter: Option<Meter>) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        let done = move |r: Result<PublishAck, PublishError>| {
            if let Some(m) = meter {
                m.record(&r);
            }
            r
        };
        if let Err(e) = check_outgoing(&out) {
            return Box::pin(std::future::ready(done(Err(e))));
        }
        let sent = self.producer.send_result(record_of(&out)).map_err(|(e, _)| e);
        let failure = Failure::of(&out, self);
        match sent {
            Ok(delivery) => {
                let topic = out.topic;
                let in_flight = self.lone.as_ref().map(|l| l.queued(|| self.producer.in_flight_count()));
                Box::pin(async move {
                    let delivered = delivery.await;
                    drop(in_flight);
                    done(match delivered {
                        Ok(Ok(d)) => Ok(PublishAck {
                            topic,
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        Ok(Err((e, _))) => Err(failure.error(e, topic)),
                        Err(_) => {
                            Err(client_error("publish", "the producer went away before the delivery report").into())
                        }
                    })
                })
            }
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                let this = self.clone();
                let in_flight = self.lone.as_ref().map(|l| l.crowded());
                Box::pin(async move {
                    let r = this.publish_when_queued(out).await;
                    drop(in_flight);
                    done(r)
                })
            }
            Err(e) => Box::pin(std::future::ready(done(Err(failure.error(e, out.topic))))),
        }
    }

    /// A publish that met a full producer queue: rdkafka's `send` waits for room (up to
    /// [`PUBLISH_TIMEOUT`]), then for the acknowledgement.
    async fn publish_when_queued(&self, out: Outgoing) -> Result<PublishAck, PublishError> {
        let failure = Failure::of(&out, self);
        match self.producer.send(record_of(&out), PUBLISH_TIMEOUT).await {
            Ok(d) => Ok(PublishAck {
                topic: out.topic,
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(failure.error(e, out.topic)),
        }
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, AdminError> {
        self.config.base().create().map_err(|e| admin_error("admin client", e))
    }

    fn metadata_consumer(&self, group: Option<&str>) -> Result<BaseConsumer<QuietContext>, AdminError> {
        let mut c = self.config.base();
        if let Some(g) = group {
            c.set("group.id", g);
        }
        c.set("enable.auto.commit", "false");
        c.create_with_context(QuietContext::new("metadata"))
            .map_err(|e| admin_error("metadata client", e))
    }

    /// Whether a broker answers, within [`PROBE_TIMEOUT`]: a subscriber starts only then, so a broker that
    /// is down or a wrong address fails the app's start in seconds with the cause, not after the group
    /// join's timeout.
    async fn probe(&self) -> Result<(), BrokerError> {
        if self.reached.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let consumer = self.metadata_consumer(None).map_err(|e| client_error("connect", e))?;
        let bootstrap = self.config.bootstrap.clone();
        let answered = tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, PROBE_TIMEOUT))
            .await
            .map_err(|e| client_error("connect", e))?;
        answered
            .map(|_| self.reached.store(true, std::sync::atomic::Ordering::Relaxed))
            .map_err(|e| {
                client_error(
                    "connect",
                    format!(
                        "no Kafka broker answered at {bootstrap} within {PROBE_TIMEOUT:?} ({e}); is it running, \
                     and is the address in the URL right?"
                    ),
                )
            })
    }

    /// The subscribed topic exists, or is created when the subscriber asks for it: a consumer of a topic
    /// that does not exist would wait for the group join's timeout and say nothing useful.
    async fn ensure_topic(&self, cfg: &crate::config::ResolvedSubscriber) -> Result<(), StartError> {
        let consumer = self.metadata_consumer(None)?;
        let topic = cfg.topic.clone();
        let partitions = blocking("metadata", move || Self::partitions_of(&consumer, &topic)).await;
        match partitions {
            Ok(p) if !p.is_empty() => Ok(()),
            Ok(_) | Err(AdminError::UnknownTopic { .. }) => match cfg.create_partitions {
                Some(n) => Ok(self.create_topic(&cfg.topic, n).await?),
                None => Err(StartError::MissingTopic {
                    subscriber: cfg.name.to_string(),
                    topic: cfg.topic.clone(),
                    url: format!("kafka://{}", self.config.bootstrap),
                }),
            },
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), AdminError> {
        let admin = self.admin()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| admin_error("create topic", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    tracing::debug!(topic = %t, error = %code, "create topic refused");
                    return Err(AdminError::Broker(code_error("create topic", code)));
                }
            }
        }
        // Wait until the metadata shows every partition, so a subscriber started next sees them all.
        let consumer = self.metadata_consumer(None)?;
        let topic = topic.to_owned();
        blocking("create topic", move || {
            let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
            loop {
                let md = consumer.fetch_metadata(Some(&topic), ADMIN_TIMEOUT);
                let n = md
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == topic)
                            .map(|t| t.partitions().len())
                    })
                    .unwrap_or(0);
                if n as i32 >= partitions {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(AdminError::Broker(BrokerError::Timeout {
                        op: "create topic",
                        timeout: ADMIN_TIMEOUT,
                    }));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
    }

    fn partitions_of(consumer: &BaseConsumer<QuietContext>, topic: &str) -> Result<Vec<i32>, AdminError> {
        let md = consumer
            .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
            .map_err(|e| admin_error("metadata", e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| AdminError::UnknownTopic {
                topic: topic.to_owned(),
            })?;
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    pub(crate) async fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>, AdminError> {
        let consumer = self.metadata_consumer(Some(group))?;
        let topic = topic.to_owned();
        blocking("committed offsets", move || {
            let mut tpl = TopicPartitionList::new();
            for p in Self::partitions_of(&consumer, &topic)? {
                tpl.add_partition(&topic, p);
            }
            let got = consumer
                .committed_offsets(tpl, ADMIN_TIMEOUT)
                .map_err(|e| admin_error("committed offsets", e))?;
            Ok(got
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect())
        })
        .await
    }

    pub(crate) async fn end_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, AdminError> {
        let consumer = self.metadata_consumer(None)?;
        let topic = topic.to_owned();
        blocking("end offsets", move || {
            let mut out = BTreeMap::new();
            for p in Self::partitions_of(&consumer, &topic)? {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, ADMIN_TIMEOUT)
                    .map_err(|e| admin_error("watermarks", e))?;
                out.insert(p, high);
            }
            Ok(out)
        })
        .await
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, AdminError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AdminError::Broker(client_error(op, e)))?
}

/// What a record may not be, checked before librdkafka sees it.
fn check_outgoing(out: &Outgoing) -> Result<(), PublishError> {
    no_exchanges(out)?;
    check_topic_name(&out.topic).map_err(|reason| PublishError::InvalidTopic {
        topic: out.topic.clone(),
        reason,
    })
}

/// The librdkafka record of an outgoing one (borrowing it: librdkafka copies what it keeps).
fn record_of(out: &Outgoing) -> FutureRecord<'_, [u8], [u8]> {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&out.topic).payload(out.payload.as_ref());
    // librdkafka allocates a header list even for no headers: only make one when there are some.
    if !out.headers.is_empty() {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (name, value) in out.headers.iter() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        record = record.headers(headers);
    }
    if let Some(k) = &out.key {
        record = record.key(k.as_ref());
    }
    if let Some(p) = out.partition {
        record = record.partition(p);
    }
    if let Some(ts) = out.timestamp {
        record = record.timestamp(ts);
    }
    record
}

/// What a failed publish's error names, kept from the record once it is handed over.
struct Failure {
    partition: Option<i32>,
    size: usize,
    max: usize,
    timeout: Duration,
}

impl Failure {
    fn of(out: &Outgoing, backend: &KafkaBackend) -> Self {
        Failure {
            partition: out.partition,
            size: record_size(out),
            max: backend.max_message_bytes,
            timeout: backend.delivery_timeout,
        }
    }

    fn error(self, e: KafkaError, topic: String) -> PublishError {
        match (e.rdkafka_error_code(), self.partition) {
            (Some(RDKafkaErrorCode::UnknownPartition), Some(partition)) => {
                PublishError::UnknownPartition { topic, partition }
            }
            (Some(RDKafkaErrorCode::MessageSizeTooLarge), _) => PublishError::TooLarge {
                size: self.size,
                max: self.max,
            },
            (Some(RDKafkaErrorCode::MessageTimedOut), _) => PublishError::Timeout { timeout: self.timeout },
            _ => kafka_error("publish", e).into(),
        }
    }
}

/// `kafka://host:port[,host:port][?librdkafka.setting=value&...]`.
pub(crate) fn open(url: &str, rest: &str) -> Result<Arc<dyn Backend>, ConfigError> {
    let config = KafkaConfig::from_url(url, rest)?;
    Ok(Arc::new(KafkaBackend::new(config)?))
}

impl Publisher for KafkaBackend {
    fn send(&self, out: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        self.enqueue(out, None)
    }

    fn send_metered(&self, out: Outgoing, meter: Meter) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        self.enqueue(out, Some(meter))
    }
}

impl Backend for KafkaBackend {
    fn has_groups(&self) -> bool {
        true
    }

    fn check_topic(&self, topic: &str) -> Result<(), String> {
        check_topic_name(topic)
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<JoinHandle<()>, StartError>> {
        Box::pin(async move {
            self.probe().await?;
            self.ensure_topic(&launch.rt.cfg).await?;
            let consumer = KafkaConsumer::start(&self.config, &launch.rt.cfg)?;
            Ok(spawn_log(launch, consumer))
        })
    }

    fn log_admin(&self) -> Option<&dyn LogAdmin> {
        Some(self)
    }
}

impl LogAdmin for KafkaBackend {
    fn create_topic<'a>(&'a self, topic: &'a str, partitions: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(KafkaBackend::create_topic(self, topic, partitions))
    }

    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>> {
        Box::pin(KafkaBackend::committed(self, group, topic))
    }

    fn end_offsets<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>> {
        Box::pin(KafkaBackend::end_offsets(self, topic))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_with_a_bad_port_is_refused_when_the_broker_is_made() {
        for (url, says) in [
            ("kafka://localhost:notaport", "`notaport`"),
            ("kafka://localhost:0", "`0`"),
            ("kafka://localhost", "no port"),
            ("kafka://:9092", "no host"),
            ("kafka://a:9092,b", "`b` has no port"),
        ] {
            let err = crate::Broker::new(url).expect_err(url);
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
        assert!(crate::Broker::new("kafka://localhost:9092,127.0.0.1:9093").is_ok());
    }

    #[test]
    fn credentials_in_the_url_are_never_shown() {
        let broker = crate::Broker::new("kafka://localhost:9092?sasl.password=hunter2&sasl.username=me").unwrap();
        assert_eq!(
            broker.url(),
            "kafka://localhost:9092?sasl.password=***&sasl.username=me"
        );
        assert!(!format!("{broker:?}").contains("hunter2"));
        let err = crate::Broker::new("kafka://localhost:x?sasl.password=hunter2").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
