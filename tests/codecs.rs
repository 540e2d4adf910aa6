//! Pluggable payload codecs, end to end on the broker under test: a codec of the user's own, and
//! MessagePack (feature `msgpack`; run with `cargo test --features msgpack --test codecs`), decoded by
//! handlers, returned to `publish_to` topics, dead-lettered when undecodable, and read by Python's
//! `msgpack` library.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
#[cfg(feature = "msgpack")]
use ferrostream::RetryPolicy;
use ferrostream::codec::{Codec, Decode, Encode, Encoded};
use ferrostream::observe::Outcome;
#[cfg(feature = "msgpack")]
use ferrostream::retry::headers;
use ferrostream::{AckPolicy, BoxError, FailureKind, Headers, State};

/// The records a collector subscriber received: payload and headers.
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<(Bytes, Headers)>>>);

impl Inbox {
    fn all(&self) -> Vec<(Bytes, Headers)> {
        self.0.lock().unwrap().clone()
    }
}

async fn collect(body: Bytes, headers: Headers, State(inbox): State<Inbox>) {
    inbox.0.lock().unwrap().push((body, headers));
}

/// Subscribes `collect` as `name` to `topic` in a fresh group.
fn collector(broker: &ferrostream::Broker, topic: &str, name: &str) {
    common::member(broker, topic, name, &common::unique("g"))
        .auto_commit(false)
        .handle(collect);
}

/// A user's own format: `id;sku;quantity` lines.
struct Semicolons;

impl Codec for Semicolons {
    const CONTENT_TYPE: &'static str = "text/x-semicolons";
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    id: u64,
    sku: String,
    quantity: u32,
}

impl Decode<Line> for Semicolons {
    fn decode(bytes: &[u8]) -> Result<Line, BoxError> {
        let text = std::str::from_utf8(bytes)?;
        let mut fields = text.split(';');
        let mut next = |name: &'static str| fields.next().ok_or(format!("missing field `{name}`"));
        let line = Line {
            id: next("id")?.parse()?,
            sku: next("sku")?.to_owned(),
            quantity: next("quantity")?.parse()?,
        };
        match fields.next() {
            Some(extra) => Err(format!("unexpected field `{extra}`").into()),
            None => Ok(line),
        }
    }
}

impl Encode<Line> for Semicolons {
    fn encode(line: &Line) -> Result<Bytes, BoxError> {
        if line.sku.contains(';') {
            return Err("a sku cannot contain `;`".into());
        }
        Ok(Bytes::from(format!("{};{};{}", line.id, line.sku, line.quantity)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_codec_decodes_arguments_and_encodes_results() {
    common::init_tracing();
    let inbox = Inbox::default();
    let broker = common::broker().with_state(inbox.clone());
    let observer = broker.observer();
    let in_topic = common::topic(&broker, "codec-custom-in", 1).await;
    let out_topic = common::topic(&broker, "codec-custom-out", 1).await;
    common::member(&broker, &in_topic, "restock", &common::unique("g"))
        .auto_commit(false)
        .publish_to(out_topic.as_str())
        .handle(|line: Encoded<Semicolons, Line>| async move {
            let Line { id, sku, quantity } = line.into_inner();
            Encoded::<Semicolons, _>::new(Line {
                id,
                sku: sku.to_uppercase(),
                quantity: quantity * 10,
            })
        });
    collector(&broker, &out_topic, "shelf");
    let app = common::start(&broker).await;

    let line = Line {
        id: 1,
        sku: "tea".to_owned(),
        quantity: 3,
    };
    broker
        .publish(Encoded::<Semicolons, _>::new(line), &in_topic)
        .await
        .unwrap();
    // A value the codec refuses to encode is a publish error, typed as such; nothing is sent.
    let refused = broker
        .publish(
            Encoded::<Semicolons, _>::new(Line {
                id: 2,
                sku: "a;b".to_owned(),
                quantity: 1,
            }),
            &in_topic,
        )
        .await;
    assert!(
        matches!(refused, Err(ferrostream::PublishError::Encode { .. })),
        "{refused:?}"
    );
    observer.wait_handled("shelf", 1, common::WAIT).await.unwrap();
    observer.wait_settled("restock", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let out = inbox.all();
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].0[..], b"1;TEA;30");
    assert_eq!(
        <Semicolons as Decode<Line>>::decode(&out[0].0).unwrap(),
        Line {
            id: 1,
            sku: "TEA".to_owned(),
            quantity: 30
        }
    );
    assert_eq!(
        broker.end_offsets(&in_topic).await.unwrap().get(&0),
        Some(&1),
        "the refused value was never sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_the_custom_codec_cannot_read_is_a_typed_decode_failure() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "codec-custom-bad", 1).await;
    common::member(&broker, &topic, "restock", &common::unique("g"))
        .ack_policy(AckPolicy::RejectOnError)
        .handle(|_: Encoded<Semicolons, Line>| async {});
    let app = common::start(&broker).await;
    broker.publish("1;tea", &topic).await.unwrap();
    broker.publish("2;tea;1", &topic).await.unwrap();
    let calls = observer.wait_handled("restock", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    match &calls[0].3 {
        Outcome::Failed {
            kind: FailureKind::Decode,
            message,
        } => assert!(
            message.contains("Line") && message.contains("missing field `quantity`"),
            "the decode error names the target type and the codec's reason: {message}"
        ),
        other => panic!("expected a decode failure, got {other:?}"),
    }
    assert_eq!(calls[1].3, Outcome::Ok);
}

#[cfg(feature = "msgpack")]
mod msgpack {
    use std::time::Duration;

    use ferrostream::codec::{Codec, MsgPackCodec};
    use ferrostream::{Batch, MsgPack};
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Order {
        id: u64,
        customer: String,
        items: Vec<Item>,
        note: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Item {
        sku: String,
        quantity: u32,
        price: f64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Billed {
        order: u64,
        total: f64,
        lines: usize,
    }

    fn sample(id: u64) -> Order {
        Order {
            id,
            customer: format!("customer-{id}"),
            items: vec![
                Item {
                    sku: "tea".to_owned(),
                    quantity: 2,
                    price: 3.5,
                },
                Item {
                    sku: "cup".to_owned(),
                    quantity: 1,
                    price: 8.25,
                },
            ],
            note: None,
        }
    }

    fn bill(order: &Order) -> Billed {
        Billed {
            order: order.id,
            total: order.items.iter().map(|i| f64::from(i.quantity) * i.price).sum(),
            lines: order.items.len(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_msgpack_order_is_decoded_and_its_msgpack_result_published() {
        common::init_tracing();
        let inbox = Inbox::default();
        let broker = common::broker().with_state(inbox.clone());
        let observer = broker.observer();
        let in_topic = common::topic(&broker, "codec-msgpack-in", 1).await;
        let out_topic = common::topic(&broker, "codec-msgpack-out", 1).await;
        common::member(&broker, &in_topic, "billing", &common::unique("g"))
            .auto_commit(false)
            .publish_to(out_topic.as_str())
            .handle(|MsgPack(order): MsgPack<Order>| async move { MsgPack(bill(&order)) });
        collector(&broker, &out_topic, "ledger");
        let app = common::start(&broker).await;

        for id in 1..=3 {
            broker.publish(MsgPack(sample(id)), &in_topic).await.unwrap();
        }
        observer.wait_handled("ledger", 3, common::WAIT).await.unwrap();
        observer.wait_settled("billing", 3, common::WAIT).await.unwrap();
        app.shutdown().await.unwrap();

        let out = inbox.all();
        let billed: Vec<Billed> = out
            .iter()
            .map(|(body, _)| rmp_serde::from_slice(body).expect("the result is MessagePack"))
            .collect();
        assert_eq!(billed, (1..=3).map(|id| bill(&sample(id))).collect::<Vec<_>>());
        assert_eq!(billed[0].total, 15.25);
        // Named fields: a map of 3 (fixmap 0x83) whose first key is "order", not an array.
        assert_eq!(out[0].0[0], 0x83);
        assert_eq!(&out[0].0[1..7], b"\xa5order");
        assert!(observer.handled("billing").iter().all(|h| h.3 == Outcome::Ok));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_msgpack_payload_is_dead_lettered_by_policy_and_nothing_is_lost() {
        common::init_tracing();
        let inbox = Inbox::default();
        let broker = common::broker().with_state(inbox.clone());
        let observer = broker.observer();
        let topic = common::topic(&broker, "codec-msgpack-bad", 1).await;
        let dlt = common::topic(&broker, "codec-msgpack-dlt", 1).await;
        let group = common::unique("g");
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        let record = seen.clone();
        common::member(&broker, &topic, "billing", &group)
            .ack_policy(AckPolicy::NackOnError)
            .retry(RetryPolicy::new(1))
            .dead_letter(&dlt)
            .handle(move |MsgPack(order): MsgPack<Order>| {
                let record = record.clone();
                async move { record.lock().unwrap().push(order.id) }
            });
        collector(&broker, &dlt, "dead-letters");
        let app = common::start(&broker).await;

        broker.publish(MsgPack(sample(1)), &topic).await.unwrap();
        // JSON is not MessagePack: `{` (0x7b) reads as the integer 123, not an order.
        broker.publish(r#"{"id": 2}"#, &topic).await.unwrap();
        // A valid MessagePack value of the wrong shape.
        broker.publish(MsgPack(vec![1, 2, 3]), &topic).await.unwrap();
        broker.publish(MsgPack(sample(4)), &topic).await.unwrap();
        let tp = ferrostream::TopicPartition::new(topic.as_str(), 0);
        observer.wait_committed("billing", &tp, 4, common::WAIT).await.unwrap();
        observer.wait_handled("dead-letters", 2, common::WAIT).await.unwrap();
        app.shutdown().await.unwrap();

        assert_eq!(*seen.lock().unwrap(), vec![1, 4], "the good orders were handled");
        let outcomes: Vec<(i64, Outcome)> = observer.handled("billing").into_iter().map(|h| (h.1, h.3)).collect();
        assert_eq!(outcomes.len(), 4, "a decode failure is not retried: {outcomes:?}");
        for (offset, outcome) in &outcomes[1..3] {
            assert!(
                matches!(outcome, Outcome::Failed { kind: FailureKind::Decode, message } if message.contains("Order")),
                "offset {offset}: {outcome:?}"
            );
        }
        let dead = inbox.all();
        let bodies: Vec<&[u8]> = dead.iter().map(|(b, _)| &b[..]).collect();
        assert_eq!(
            bodies,
            vec![&br#"{"id": 2}"#[..], &b"\x93\x01\x02\x03"[..]],
            "the undecodable payloads are dead-lettered as they came"
        );
        for (_, h) in &dead {
            let error = h.get_str(headers::ERROR).unwrap_or_default();
            assert!(error.contains("Order"), "{error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_msgpack_orders_decodes_each_one() {
        common::init_tracing();
        let broker = common::broker();
        let observer = broker.observer();
        let topic = common::topic(&broker, "codec-msgpack-batch", 1).await;
        let batches: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
        let record = batches.clone();
        common::member(&broker, &topic, "billing", &common::unique("g"))
            .auto_commit(false)
            .batch(10, Duration::from_millis(50))
            .handle(move |Batch(orders): Batch<MsgPack<Order>>| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .unwrap()
                        .push(orders.into_iter().map(|o| o.0.id).collect())
                }
            });
        // Published before the app starts, so the first poll sees all five.
        for id in 1..=5 {
            broker.publish(MsgPack(sample(id)), &topic).await.unwrap();
        }
        let app = common::start(&broker).await;
        observer.wait_settled("billing", 5, common::WAIT).await.unwrap();
        app.shutdown().await.unwrap();
        let ids: Vec<u64> = batches.lock().unwrap().concat();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    }

    /// Runs `script` with python3, `input` on its standard input; returns its standard output.
    fn python(script: &str, input: &[u8]) -> Vec<u8> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn python_has_msgpack() -> bool {
        std::process::Command::new("python3")
            .args(["-c", "import msgpack"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_msgpack_reads_what_ferrostream_writes_and_the_other_way_round() {
        // scripts/test.sh installs it; a missing package fails loudly instead of skipping the check.
        assert!(
            python_has_msgpack(),
            "python3 with the `msgpack` package is needed (`pip3 install msgpack`) to check MessagePack \
             interop with other languages"
        );
        common::init_tracing();
        let inbox = Inbox::default();
        let broker = common::broker().with_state(inbox.clone());
        let observer = broker.observer();
        let in_topic = common::topic(&broker, "codec-py-in", 1).await;
        let out_topic = common::topic(&broker, "codec-py-out", 1).await;
        common::member(&broker, &in_topic, "billing", &common::unique("g"))
            .auto_commit(false)
            .publish_to(out_topic.as_str())
            .handle(|MsgPack(order): MsgPack<Order>| async move { MsgPack(bill(&order)) });
        collector(&broker, &out_topic, "ledger");
        let app = common::start(&broker).await;

        // Python writes an order (a dict, as a FastStream service would) ...
        let from_python = python(
            "import msgpack, sys\n\
             order = {'id': 9, 'customer': 'py', 'note': 'from python',\n\
                      'items': [{'sku': 'tea', 'quantity': 4, 'price': 2.5}]}\n\
             sys.stdout.buffer.write(msgpack.packb(order))",
            b"",
        );
        broker.publish(Bytes::from(from_python), &in_topic).await.unwrap();
        observer.wait_handled("ledger", 1, common::WAIT).await.unwrap();
        app.shutdown().await.unwrap();
        assert_eq!(observer.handled("billing")[0].3, Outcome::Ok);

        // ... and reads ferrostream's result as a dict keyed by field name.
        let (result, _) = inbox.all().remove(0);
        let seen = python(
            "import msgpack, sys, json\n\
             billed = msgpack.unpackb(sys.stdin.buffer.read())\n\
             assert isinstance(billed, dict), type(billed)\n\
             print(json.dumps(billed, sort_keys=True))",
            &result,
        );
        assert_eq!(
            String::from_utf8(seen).unwrap().trim(),
            r#"{"lines": 1, "order": 9, "total": 10.0}"#
        );

        // The codec on its own, with every serde shape Python meets in practice.
        let order = Order {
            note: Some("ünïcode".to_owned()),
            ..sample(3)
        };
        let bytes = <MsgPackCodec as ferrostream::codec::Encode<Order>>::encode(&order).unwrap();
        let seen = python(
            "import msgpack, sys, json\n\
             print(json.dumps(msgpack.unpackb(sys.stdin.buffer.read()), sort_keys=True, ensure_ascii=False))",
            &bytes,
        );
        assert_eq!(
            String::from_utf8(seen).unwrap().trim(),
            r#"{"customer": "customer-3", "id": 3, "items": [{"price": 3.5, "quantity": 2, "sku": "tea"}, {"price": 8.25, "quantity": 1, "sku": "cup"}], "note": "ünïcode"}"#
        );
        assert_eq!(MsgPackCodec::CONTENT_TYPE, "application/msgpack");
    }
}
