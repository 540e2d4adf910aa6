//! The service's AsyncAPI 3.0 description, generated from what the app declares.
//!
//! [`App::asyncapi`](crate::App::asyncapi) describes the broker's server (from its URL, never with
//! credentials), a channel per topic or queue, an operation per subscriber (`receive`, with its group or
//! queue bindings and, when its handler returns a payload, the `reply` it sends to a request's
//! `reply_to`), an operation per `publish_to` target, dead-letter topic and declared
//! [`Publisher`](crate::Publisher) (`send`), and a message per payload type with its JSON Schema:
//! `Json<T>` takes `T`'s [`JsonSchema`](schemars::JsonSchema), `String` and `Bytes` are a string,
//! other codecs are named with their content type.
//!
//! ```
//! use ferrostream::{App, Broker, Json};
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! /// An order placed in the shop.
//! struct Order { id: u64 }
//!
//! let broker = Broker::new("memory://").unwrap();
//! broker.subscriber("orders").group_id("billing").description("Bills each order.")
//!     .handle(|Json(order): Json<Order>| async move { println!("{}", order.id) });
//! let app = App::new(broker).title("shop").version("1.2.0");
//! let doc = app.asyncapi().unwrap();
//! assert_eq!(doc.as_json()["operations"]["orders_billing"]["action"], "receive");
//! assert_eq!(doc.as_json()["components"]["schemas"]["Order"]["description"], "An order placed in the shop.");
//! ```

mod payload;

use std::sync::Arc;

use serde_json::{Map, Value, json};

pub use payload::{Payload, Schemas};

use crate::config::ResolvedSubscriber;
use crate::handler::ErasedHandler;
use crate::message::{CORRELATION_ID, REPLY_TO};
use crate::settle::AckPolicy;

/// The version of AsyncAPI the documents follow.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The service's title, version and description: the document's `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub(crate) title: String,
    pub(crate) version: String,
    pub(crate) description: Option<String>,
}

impl Default for Info {
    /// Titled after the running executable, version `0.1.0`.
    fn default() -> Self {
        let title = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "ferrostream service".to_owned());
        Info {
            title,
            version: "0.1.0".to_owned(),
            description: None,
        }
    }
}

/// A generated AsyncAPI document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document(Value);

impl Document {
    /// The document as JSON.
    pub fn as_json(&self) -> &Value {
        &self.0
    }

    /// Pretty-printed JSON, its sections in the specification's order.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.ordered()).unwrap_or_default()
    }

    /// YAML (feature `docs`), its sections in the specification's order.
    #[cfg(feature = "docs")]
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(&self.ordered()).unwrap_or_default()
    }

    fn ordered(&self) -> Ordered<'_> {
        let section = |k: &str| self.0.get(k);
        Ordered {
            asyncapi: section("asyncapi"),
            info: section("info"),
            default_content_type: section("defaultContentType"),
            servers: section("servers"),
            channels: section("channels"),
            operations: section("operations"),
            components: section("components"),
        }
    }

    /// Every channel address, operation and message name, as a person looks for them on the docs page.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let section = |key: &str| self.0[key].as_object().cloned().unwrap_or_default();
        for channel in section("channels").values() {
            if let Some(address) = channel["address"].as_str() {
                names.push(address.to_owned());
            }
        }
        names.extend(section("operations").keys().cloned());
        if let Some(messages) = self.0["components"]["messages"].as_object() {
            names.extend(messages.values().filter_map(|m| m["name"].as_str().map(str::to_owned)));
        }
        names.sort();
        names.dedup();
        names
    }
}

/// The document's top level in the order people read it (a JSON map would sort it).
#[derive(serde::Serialize)]
struct Ordered<'a> {
    asyncapi: Option<&'a Value>,
    info: Option<&'a Value>,
    #[serde(rename = "defaultContentType")]
    default_content_type: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    servers: Option<&'a Value>,
    channels: Option<&'a Value>,
    operations: Option<&'a Value>,
    components: Option<&'a Value>,
}

/// A subscriber as the document describes it.
pub(crate) struct DescribedSubscriber {
    pub(crate) cfg: ResolvedSubscriber,
    pub(crate) handler: Arc<dyn ErasedHandler>,
}

/// A declared publisher: its topic (router prefix included), exchange and description.
pub(crate) struct DescribedPublisher {
    pub(crate) topic: String,
    pub(crate) exchange: Option<String>,
    pub(crate) description: Option<String>,
}

/// Everything the document is made from.
pub(crate) struct Declarations {
    pub(crate) url: String,
    pub(crate) subscribers: Vec<DescribedSubscriber>,
    pub(crate) publishers: Vec<DescribedPublisher>,
}

/// The broker family, from the URL's scheme: it chooses the bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Kafka,
    Amqp,
    Other,
}

const KAFKA_BINDING: &str = "0.5.0";
const AMQP_BINDING: &str = "0.3.0";
const HEADERS_SCHEMA: &str = "ferrostream.Headers";

pub(crate) fn generate(info: &Info, decl: &Declarations) -> Document {
    let mut b = Builder {
        protocol: protocol_of(&decl.url),
        schemas: Schemas::new(),
        channels: Map::new(),
        operations: Map::new(),
        messages: Map::new(),
    };
    for s in &decl.subscribers {
        b.subscriber(s);
    }
    for p in &decl.publishers {
        b.publisher(p);
    }
    let mut schemas = b.schemas.into_definitions();
    if !b.messages.is_empty() {
        schemas.insert(HEADERS_SCHEMA.to_owned(), headers_schema());
    }
    let mut doc = json!({
        "asyncapi": ASYNCAPI_VERSION,
        "info": { "title": info.title, "version": info.version },
        "defaultContentType": "application/json",
    });
    if let Some(d) = &info.description {
        doc["info"]["description"] = json!(d);
    }
    let servers = servers(&decl.url);
    if !servers.is_empty() {
        doc["servers"] = Value::Object(servers);
    }
    doc["channels"] = Value::Object(b.channels);
    doc["operations"] = Value::Object(b.operations);
    doc["components"] = json!({ "messages": b.messages, "schemas": schemas });
    Document(doc)
}

struct Builder {
    protocol: Protocol,
    schemas: Schemas,
    channels: Map<String, Value>,
    operations: Map<String, Value>,
    messages: Map<String, Value>,
}

impl Builder {
    fn subscriber(&mut self, s: &DescribedSubscriber) {
        let cfg = &s.cfg;
        let (received, results) = s.handler.describe(&mut self.schemas);
        let channel = self.channel(&cfg.topic, None);
        if let Some(bindings) = self.queue_bindings(cfg) {
            self.channels[&channel]["bindings"] = bindings;
        }
        let received_refs: Vec<Value> = received.iter().map(|p| self.message_in(&channel, p)).collect();
        let name = cfg.name.to_string();
        let mut op = json!({
            "action": "receive",
            "title": name,
            "channel": channel_ref(&channel),
            "messages": received_refs,
            "x-ferrostream": subscriber_extension(cfg),
        });
        if let Some(d) = &cfg.description {
            op["description"] = json!(d);
        }
        if let Some(bindings) = self.receive_bindings(cfg) {
            op["bindings"] = bindings;
        }
        if !results.is_empty() {
            // A request (a message with reply_to) gets the handler's result as its reply.
            let reply = key(&format!("{name}.reply"));
            self.channels.insert(
                reply.clone(),
                json!({
                    "address": null,
                    "description": format!("Replies of {name}: sent to the request's `{REPLY_TO}` header."),
                    "messages": {},
                }),
            );
            let refs: Vec<Value> = results.iter().map(|p| self.message_in(&reply, p)).collect();
            op["reply"] = json!({
                "address": { "location": format!("$message.header#/{REPLY_TO}") },
                "channel": channel_ref(&reply),
                "messages": refs,
            });
        }
        self.operations.insert(key(&name), op);

        for target in &cfg.publish_to {
            let target = target.resolved();
            let to = self.channel(&target.topic, target.defaults.exchange.as_deref());
            let refs: Vec<Value> = results.iter().map(|p| self.message_in(&to, p)).collect();
            self.operations.insert(
                key(&format!("{name}.to.{}", target.topic)),
                json!({
                    "action": "send",
                    "title": format!("{name} publishes its results to {}", target.topic),
                    "channel": channel_ref(&to),
                    "messages": refs,
                }),
            );
        }
        if let Some(dead_letter) = &cfg.dead_letter {
            let to = self.channel(dead_letter, None);
            let refs: Vec<Value> = received.iter().map(|p| self.message_in(&to, p)).collect();
            self.operations.insert(
                key(&format!("{name}.dead_letter")),
                json!({
                    "action": "send",
                    "title": format!("{name} dead-letters what it rejects"),
                    "description": "The rejected message as it came, with headers naming the error and where it came from.",
                    "channel": channel_ref(&to),
                    "messages": refs,
                }),
            );
        }
    }

    fn publisher(&mut self, p: &DescribedPublisher) {
        let channel = self.channel(&p.topic, p.exchange.as_deref());
        let mut op = json!({
            "action": "send",
            "title": format!("publishes to {}", p.topic),
            "channel": channel_ref(&channel),
            "messages": [],
        });
        if let Some(d) = &p.description {
            op["description"] = json!(d);
        }
        self.operations.insert(key(&format!("publish.{}", p.topic)), op);
    }

    /// The channel of a topic (or of a routing key on an exchange), created on first use; its key.
    fn channel(&mut self, topic: &str, exchange: Option<&str>) -> String {
        let k = match exchange {
            Some(x) => key(&format!("{x}.{topic}")),
            None => key(topic),
        };
        if !self.channels.contains_key(&k) {
            let mut channel = json!({ "address": topic, "messages": {} });
            match (self.protocol, exchange) {
                (Protocol::Kafka, _) => {
                    channel["bindings"] = json!({ "kafka": { "topic": topic, "bindingVersion": KAFKA_BINDING } });
                }
                (Protocol::Amqp, Some(x)) => {
                    channel["bindings"] = json!({ "amqp": {
                        "is": "routingKey",
                        "exchange": { "name": x },
                        "bindingVersion": AMQP_BINDING,
                    } });
                }
                _ => {}
            }
            self.channels.insert(k.clone(), channel);
        }
        k
    }

    /// Registers `payload` as a component message (once per distinct payload) and lists it in the
    /// channel; the reference an operation uses.
    fn message_in(&mut self, channel: &str, payload: &Payload) -> Value {
        let base = key(payload.name());
        let mut name = base.clone();
        let message = json!({
            "name": payload.name(),
            "title": payload.name(),
            "contentType": payload.content_type(),
            "payload": payload.schema(),
            "headers": { "$ref": format!("#/components/schemas/{HEADERS_SCHEMA}") },
            "correlationId": { "location": format!("$message.header#/{CORRELATION_ID}") },
        });
        let mut n = 1;
        while let Some(existing) = self.messages.get(&name) {
            if *existing == message {
                break;
            }
            n += 1;
            name = format!("{base}_{n}");
        }
        self.messages.entry(name.clone()).or_insert(message);
        self.channels[channel]["messages"][&name] = json!({ "$ref": format!("#/components/messages/{name}") });
        json!({ "$ref": format!("#/channels/{channel}/messages/{name}") })
    }

    fn queue_bindings(&self, cfg: &ResolvedSubscriber) -> Option<Value> {
        match self.protocol {
            Protocol::Kafka => {
                let mut kafka = json!({ "topic": cfg.topic, "bindingVersion": KAFKA_BINDING });
                if let Some(n) = cfg.create_partitions {
                    kafka["partitions"] = json!(n);
                }
                Some(json!({ "kafka": kafka }))
            }
            #[cfg(feature = "amqp")]
            Protocol::Amqp => {
                let queue = cfg.queue.clone().unwrap_or_default();
                Some(json!({ "amqp": queue.describe(&cfg.topic, AMQP_BINDING) }))
            }
            _ => None,
        }
    }

    fn receive_bindings(&self, cfg: &ResolvedSubscriber) -> Option<Value> {
        match self.protocol {
            Protocol::Kafka => {
                let group = cfg.group_id.as_ref()?;
                Some(json!({ "kafka": {
                    "groupId": { "type": "string", "enum": [group] },
                    "bindingVersion": KAFKA_BINDING,
                } }))
            }
            Protocol::Amqp => Some(json!({ "amqp": {
                "ack": cfg.policy != AckPolicy::AckFirst,
                "bindingVersion": AMQP_BINDING,
            } })),
            Protocol::Other => None,
        }
    }
}

/// What ferrostream adds about a subscriber: its settle policy, retries, dead letter, batching.
fn subscriber_extension(cfg: &ResolvedSubscriber) -> Value {
    let mut x = json!({ "ackPolicy": format!("{:?}", cfg.policy) });
    if let Some(group) = &cfg.group_id {
        x["group"] = json!(group);
    }
    if let Some(dl) = &cfg.dead_letter {
        x["deadLetter"] = json!(dl);
    }
    if let Some(retry) = &cfg.retry {
        x["retry"] = json!(format!("{retry:?}"));
    }
    if let Some(batch) = &cfg.batch {
        x["batch"] = json!({ "maxRecords": batch.max_records, "timeoutMs": batch.timeout.as_millis() as u64 });
    }
    x
}

fn channel_ref(key: &str) -> Value {
    json!({ "$ref": format!("#/channels/{key}") })
}

/// A key usable in the document's maps and in a `$ref`: letters, digits, `.`, `_` and `-`; anything
/// else becomes `_`.
fn key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn headers_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            CORRELATION_ID: {
                "type": "string",
                "description": "Ties a result, reply or dead letter to the message it answers.",
            },
            REPLY_TO: {
                "type": "string",
                "description": "On a request: where its reply goes.",
            },
        },
    })
}

fn protocol_of(url: &str) -> Protocol {
    match url.split_once("://").map(|(s, _)| s) {
        Some("kafka") => Protocol::Kafka,
        Some("amqp" | "amqps") => Protocol::Amqp,
        _ => Protocol::Other,
    }
}

/// The servers of a broker URL: host and port, protocol, the AMQP virtual host; never the user, the
/// password or the query (where client secrets go).
fn servers(url: &str) -> Map<String, Value> {
    let mut servers = Map::new();
    let Some((scheme, rest)) = url.split_once("://") else {
        return servers;
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match scheme {
        "kafka" => {
            for (i, host) in hosts.split(',').filter(|h| !h.is_empty()).enumerate() {
                let name = if i == 0 {
                    "kafka".to_owned()
                } else {
                    format!("kafka-{}", i + 1)
                };
                servers.insert(
                    name,
                    json!({ "host": host, "protocol": "kafka", "description": "A bootstrap server of the Kafka cluster." }),
                );
            }
        }
        "amqp" | "amqps" => {
            let mut server = json!({
                "host": hosts,
                "protocol": scheme,
                "protocolVersion": "0.9.1",
                "description": "The RabbitMQ server.",
            });
            if !path.is_empty() {
                server["pathname"] = json!(format!("/{path}"));
            }
            servers.insert("rabbitmq".to_owned(), server);
        }
        "memory" => {
            servers.insert(
                "memory".to_owned(),
                json!({
                    "host": "localhost",
                    "protocol": "memory",
                    "description": "ferrostream's in-memory broker, inside the service's own process.",
                }),
            );
        }
        _ => {}
    }
    servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_never_carry_credentials_or_query_settings() {
        let s = servers("amqp://guest:secret@rabbit.local:5672/%2f?heartbeat=10");
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            !text.contains("secret") && !text.contains("guest") && !text.contains("heartbeat"),
            "{text}"
        );
        assert_eq!(s["rabbitmq"]["host"], "rabbit.local:5672");
        assert_eq!(s["rabbitmq"]["pathname"], "/%2f");
        let k = servers("kafka://user:pw@a:9092,b:9093?sasl.password=x");
        assert_eq!(k["kafka"]["host"], "a:9092");
        assert_eq!(k["kafka-2"]["host"], "b:9093");
        assert!(!serde_json::to_string(&k).unwrap().contains("pw"));
    }

    #[test]
    fn keys_are_safe_in_references() {
        assert_eq!(key("orders@billing/v1 ~x"), "orders_billing_v1__x");
        assert_eq!(key("shop.orders-2_a"), "shop.orders-2_a");
    }
}
