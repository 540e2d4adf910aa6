//! The AsyncAPI document: generated from what the app declares, valid for the official parser
//! (`@asyncapi/parser`), never carrying credentials, and snapshotted so a change is seen.
#![cfg(feature = "docs")]

#[path = "common/web.rs"]
mod web;

use bytes::Bytes;
use ferrostream::{AckPolicy, App, Broker, Json, Router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An order placed in the shop.
#[derive(Serialize, Deserialize, JsonSchema)]
struct Order {
    /// The order's number.
    id: u64,
    lines: Vec<Line>,
    coupon: Option<String>,
}

/// One line of an order.
#[derive(Serialize, Deserialize, JsonSchema)]
struct Line {
    sku: String,
    quantity: u32,
}

/// What is paid for an order.
#[derive(Serialize, Deserialize, JsonSchema)]
struct Invoice {
    order: u64,
    amount_cents: u64,
}

/// The app every test here describes, on the broker at `url` (lazily connected: nothing runs).
fn shop(url: &str) -> App {
    let broker = Broker::new(url).unwrap();
    let router = Router::new("shop.").group_id("shop").ack_policy(AckPolicy::NackOnError);
    router
        .subscriber("orders")
        .name("billing")
        .description("Bills each order.")
        .create_topic(4)
        .dead_letter("dead")
        .publish_to("invoices")
        .handle(|Json(o): Json<Order>| async move {
            Json(Invoice {
                order: o.id,
                amount_cents: 0,
            })
        });
    router.subscriber("notes").name("notes").handle(|_: String| async {});
    router.publisher("audit").description("The audit trail.");
    broker.include_router(router);
    broker.subscriber("raw").group_id("archive").handle(|_: Bytes| async {});
    App::new(broker)
        .title("shop")
        .version("1.2.3")
        .description("Bills orders.")
}

fn doc(url: &str) -> Value {
    shop(url)
        .asyncapi()
        .expect("the app is declared right")
        .as_json()
        .clone()
}

#[test]
fn payload_schemas_come_from_the_handlers_types_with_their_doc_comments() {
    let d = doc("memory://");
    let schemas = &d["components"]["schemas"];
    assert_eq!(schemas["Order"]["description"], "An order placed in the shop.");
    assert_eq!(
        schemas["Order"]["properties"]["id"]["description"],
        "The order's number."
    );
    assert_eq!(schemas["Order"]["properties"]["id"]["type"], "integer");
    assert_eq!(
        schemas["Order"]["properties"]["lines"]["items"],
        json!({ "$ref": "#/components/schemas/Line" })
    );
    assert_eq!(schemas["Order"]["required"], json!(["id", "lines"]));
    assert_eq!(schemas["Line"]["properties"]["quantity"]["type"], "integer");
    let messages = &d["components"]["messages"];
    assert_eq!(
        messages["Order"]["payload"],
        json!({ "$ref": "#/components/schemas/Order" })
    );
    assert_eq!(messages["Order"]["contentType"], "application/json");
    assert_eq!(
        messages["Invoice"]["payload"],
        json!({ "$ref": "#/components/schemas/Invoice" })
    );
    // String and Bytes as what they are.
    assert_eq!(messages["Text"]["contentType"], "text/plain");
    assert_eq!(messages["Text"]["payload"], json!({ "type": "string" }));
    assert_eq!(
        messages["Bytes"]["payload"],
        json!({ "type": "string", "format": "binary" })
    );
    assert_eq!(
        messages["Order"]["correlationId"]["location"],
        "$message.header#/correlation_id"
    );
}

#[test]
fn operations_receive_send_and_reply_as_declared() {
    let d = doc("memory://");
    assert_eq!(
        d["info"],
        json!({ "title": "shop", "version": "1.2.3", "description": "Bills orders." })
    );
    let ops = &d["operations"];
    let billing = &ops["billing"];
    assert_eq!(billing["action"], "receive");
    assert_eq!(billing["description"], "Bills each order.");
    assert_eq!(billing["channel"], json!({ "$ref": "#/channels/shop.orders" }));
    assert_eq!(
        billing["messages"],
        json!([{ "$ref": "#/channels/shop.orders/messages/Order" }])
    );
    assert_eq!(billing["x-ferrostream"]["ackPolicy"], "NackOnError");
    assert_eq!(billing["x-ferrostream"]["group"], "shop");
    // Its result goes to shop.invoices, and is the reply to a request.
    assert_eq!(ops["billing.to.shop.invoices"]["action"], "send");
    assert_eq!(
        ops["billing.to.shop.invoices"]["messages"],
        json!([{ "$ref": "#/channels/shop.invoices/messages/Invoice" }])
    );
    assert_eq!(billing["reply"]["address"]["location"], "$message.header#/reply_to");
    assert_eq!(
        billing["reply"]["messages"],
        json!([{ "$ref": "#/channels/billing.reply/messages/Invoice" }])
    );
    assert_eq!(d["channels"]["billing.reply"]["address"], Value::Null);
    // What it rejects goes to the dead-letter topic as it came.
    assert_eq!(
        ops["billing.dead_letter"]["messages"],
        json!([{ "$ref": "#/channels/shop.dead/messages/Order" }])
    );
    // A handler without a result has no reply.
    assert!(ops["notes"].get("reply").is_none());
    assert_eq!(ops["publish.shop.audit"]["action"], "send");
    assert_eq!(ops["publish.shop.audit"]["description"], "The audit trail.");
    assert_eq!(d["channels"]["shop.audit"]["address"], "shop.audit");
    // The names a person looks for.
    let names = shop("memory://").asyncapi().unwrap().names();
    for name in [
        "shop.orders",
        "shop.invoices",
        "billing",
        "Order",
        "Invoice",
        "raw_archive",
    ] {
        assert!(names.contains(&name.to_owned()), "{name} missing from {names:?}");
    }
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_bindings_name_the_group_and_partitions_and_no_credentials_leak() {
    let d = doc("kafka://alice:s3cret@k1.local:9092,k2.local:9093?sasl.password=hunter2");
    let text = d.to_string();
    for secret in ["alice", "s3cret", "hunter2", "sasl"] {
        assert!(!text.contains(secret), "`{secret}` leaked into the document");
    }
    assert_eq!(
        d["servers"]["kafka"],
        json!({ "host": "k1.local:9092", "protocol": "kafka", "description": "A bootstrap server of the Kafka cluster." })
    );
    assert_eq!(d["servers"]["kafka-2"]["host"], "k2.local:9093");
    assert_eq!(
        d["operations"]["billing"]["bindings"]["kafka"]["groupId"],
        json!({ "type": "string", "enum": ["shop"] })
    );
    assert_eq!(d["channels"]["shop.orders"]["bindings"]["kafka"]["partitions"], 4);
    assert_eq!(
        d["channels"]["shop.orders"]["bindings"]["kafka"]["topic"],
        "shop.orders"
    );
}

#[cfg(feature = "amqp")]
#[test]
fn amqp_bindings_name_the_queue_and_exchanges_and_no_credentials_leak() {
    use ferrostream::amqp::{Exchange, Queue};
    let broker = Broker::new("amqp://alice:s3cret@rabbit.local:5672/%2f?heartbeat=10").unwrap();
    broker
        .subscriber("events")
        .queue(Queue::durable().quorum().bind(Exchange::topic("shop"), "order.*"))
        .handle(|_: String| async {});
    let d = App::new(broker).asyncapi().unwrap().as_json().clone();
    let text = d.to_string();
    for secret in ["alice", "s3cret", "heartbeat"] {
        assert!(!text.contains(secret), "`{secret}` leaked into the document");
    }
    assert_eq!(d["servers"]["rabbitmq"]["host"], "rabbit.local:5672");
    assert_eq!(d["servers"]["rabbitmq"]["protocol"], "amqp");
    let amqp = &d["channels"]["events"]["bindings"]["amqp"];
    assert_eq!(amqp["is"], "queue");
    assert_eq!(amqp["queue"]["name"], "events");
    assert_eq!(amqp["queue"]["durable"], true);
    assert_eq!(amqp["x-bindings"][0]["exchange"], "shop");
    assert_eq!(amqp["x-bindings"][0]["routingKey"], "order.*");
    assert_eq!(
        d["operations"]["events"]["bindings"]["amqp"]["ack"], false,
        "AckFirst acks on receipt"
    );
}

#[test]
fn a_subscriber_declared_wrong_fails_the_document_as_it_would_fail_the_start() {
    let broker = Broker::new("memory://").unwrap();
    broker.subscriber("a").name("same").handle(|_: String| async {});
    broker.subscriber("b").name("same").handle(|_: String| async {});
    let err = App::new(broker).asyncapi().unwrap_err();
    assert!(err.to_string().contains("same"), "{err}");
}

#[test]
fn the_document_is_valid_for_the_official_parser_in_json_and_yaml() {
    let doc = shop("memory://").asyncapi().unwrap();
    let dir = tempdir();
    let json = dir.join("shop.json");
    let yaml = dir.join("shop.yaml");
    std::fs::write(&json, doc.to_json_pretty()).unwrap();
    std::fs::write(&yaml, doc.to_yaml()).unwrap();
    web::assert_valid_asyncapi(&[&json, &yaml]);
    // YAML and JSON say the same.
    let back: Value = serde_norway::from_str(&doc.to_yaml()).unwrap();
    assert_eq!(&back, doc.as_json());
}

#[test]
fn the_document_is_snapshotted() {
    insta::assert_snapshot!(shop("memory://").asyncapi().unwrap().to_json_pretty());
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("asyncapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
