//! OpenTelemetry traces (feature `otel`): a consumer span per handler call and a producer span per
//! publish, with OpenTelemetry's messaging attributes, and W3C trace context (`traceparent`,
//! `tracestate`) read from a message's headers and written into every record published, so a message
//! published from a handler continues the trace of the message it came from.
//!
//! The spans are `tracing` spans (the handler's is the same span that gives its log lines their context),
//! exported by a [`tracing_opentelemetry`] layer over your tracer provider and exporter:
//!
//! ```no_run
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//! # fn exporter() -> opentelemetry_sdk::trace::InMemorySpanExporter { unimplemented!() }
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_simple_exporter(exporter()) // e.g. opentelemetry-otlp's SpanExporter
//!     .build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-service")));
//! tracing::subscriber::set_global_default(subscriber).unwrap();
//! ```
//!
//! | span | kind | name | attributes |
//! |---|---|---|---|
//! | a handler call | consumer | `process <topic>` | `messaging.system`, `messaging.operation.type=process`, `messaging.destination.name`, `messaging.destination.partition.id`, `messaging.kafka.offset` (the delivery tag on RabbitMQ), `messaging.consumer.group.name`, `messaging.message.conversation_id` (the correlation id), `messaging.batch.message_count` |
//! | a publish | producer | `send <topic>` | `messaging.system`, `messaging.operation.type=send`, `messaging.destination.name` |

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{Headers, Message};
use crate::transport::Outgoing;

struct Read<'a>(&'a Headers);

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get_str(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

struct Write<'a>(&'a mut Headers);

impl Injector for Write<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set(key, value);
    }
}

/// Makes a handler call's span a consumer span that continues the trace of `first` (its
/// `traceparent` header), with the messaging attributes. Before the span is first entered.
pub(crate) fn process(span: &tracing::Span, first: &Message, batch: usize, system: &'static str, group: Option<&str>) {
    if span.is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Read(first.headers()));
    let _ = span.set_parent(parent);
    span.set_attribute("messaging.system", system);
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute("messaging.destination.name", first.topic().to_owned());
    span.set_attribute("messaging.destination.partition.id", first.partition().to_string());
    span.set_attribute("messaging.kafka.offset", first.offset());
    if let Some(group) = group {
        span.set_attribute("messaging.consumer.group.name", group.to_owned());
    }
    if let Some(id) = first.correlation_id() {
        span.set_attribute("messaging.message.conversation_id", id.to_owned());
    }
    if batch > 1 {
        span.set_attribute("messaging.batch.message_count", batch as i64);
    }
}

/// The call failed: its span's status says so.
pub(crate) fn failed(span: &tracing::Span, error: &crate::Error) {
    span.set_status(opentelemetry::trace::Status::error(error.to_string()));
}

/// A producer span for one publish, child of the current span (a handler's, when it publishes), its
/// context written into the record's headers for the consumer to continue.
pub(crate) fn send(out: &mut Outgoing, system: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.kind = %"producer",
        otel.name = %format_args!("send {}", out.topic),
        topic = %out.topic,
    );
    if span.is_none() {
        return span;
    }
    span.set_attribute("messaging.system", system);
    span.set_attribute("messaging.operation.type", "send");
    span.set_attribute("messaging.operation.name", "send");
    span.set_attribute("messaging.destination.name", out.topic.clone());
    TraceContextPropagator::new().inject_context(&span.context(), &mut Write(&mut out.headers));
    span
}

/// Exports the traces with OTLP over HTTP (feature `otlp`) to `OTEL_EXPORTER_OTLP_ENDPOINT` (default
/// `http://localhost:4318`), batched on a thread of the exporter's own. Keep it for the life of the
/// process and [`shutdown`](Otlp::shutdown) it at the end, which sends what is still batched.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt;
/// let otlp = ferrostream::otel::Otlp::new("shop").expect("an OTLP exporter");
/// let subscriber = tracing_subscriber::registry().with(otlp.layer());
/// tracing::subscriber::set_global_default(subscriber).unwrap();
/// // ... run the app ...
/// otlp.shutdown();
/// ```
#[cfg(feature = "otlp")]
#[derive(Debug, Clone)]
pub struct Otlp {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

#[cfg(feature = "otlp")]
impl Otlp {
    /// An exporter for the service `service_name` (the `service.name` resource attribute).
    pub fn new(service_name: &str) -> Result<Self, opentelemetry_otlp::ExporterBuildError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        Ok(Otlp { provider })
    }

    /// The tracing layer that turns spans into exported OpenTelemetry spans.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("ferrostream"))
    }

    /// Sends what is batched and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the OTLP exporter did not shut down cleanly");
        }
    }
}
