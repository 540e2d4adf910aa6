//! The application layer: routers (prefix, defaults, nesting), middleware around handler calls and
//! publishes (order, short-circuit, settle, transform, tower layers), publisher objects, results with
//! key and headers, and filters. Runs on the broker `FERROSTREAM_TEST_BROKER` names (memory:// by
//! default; the test command runs it on Kafka too).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::middleware::{self, Next, Outgoing, PublishNext, Request};
use ferrostream::observe::Outcome;
use ferrostream::{AckPolicy, Broker, Message, Publisher, Response, RetryPolicy, Router, Settle, SettledBy, State};

/// What a recorder saw of each message: payload, key, headers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    payload: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Seen>>>);

impl Inbox {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Subscribes a recorder named `name` to `topic`, recording into `inbox`.
fn record_into(broker: &Broker, topic: &str, name: &str, inbox: &Inbox) {
    let inbox = inbox.clone();
    common::member(broker, topic, name, &common::unique("rec"))
        .auto_commit(false)
        .handle(move |msg: Message| {
            let inbox = inbox.clone();
            async move {
                inbox.0.lock().unwrap().push(Seen {
                    payload: text(msg.payload()),
                    key: msg.key().map(|k| text(k)),
                    headers: msg.headers().iter().map(|(n, v)| (n.to_owned(), text(v))).collect(),
                });
            }
        });
}

/// A log of what middleware saw, in order.
#[derive(Clone, Default)]
struct Trail(Arc<Mutex<Vec<String>>>);

impl Trail {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A middleware that notes `name` before and after the rest of the chain.
type Called = futures::future::BoxFuture<'static, Result<Option<Response>, ferrostream::Error>>;

fn tracer(
    trail: &Trail,
    name: &'static str,
) -> middleware::FromFnLayer<impl Fn(Request, Next) -> Called + Clone + Send + Sync + 'static> {
    let trail = trail.clone();
    middleware::from_fn(move |req: Request, next: Next| {
        let trail = trail.clone();
        Box::pin(async move {
            trail.push(format!("{name}>"));
            let r = next.run(req).await;
            trail.push(format!("<{name}"));
            r
        }) as Called
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_prefix_topics_and_give_defaults_that_subscribers_may_override() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let base = common::unique("rt");
    let (outer_prefix, inner_prefix) = (format!("{base}."), "billing.");
    let outer = Router::new(&outer_prefix)
        .group_id(common::unique("outer-group"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(2).backoff(Duration::from_millis(5), Duration::from_millis(5)))
        .dead_letter("dlt");
    let inner = Router::new(inner_prefix).group_id(common::unique("inner-group"));
    let results = inner.publisher("invoiced");
    inner
        .subscriber("orders")
        .name("inner-orders")
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .publish_to(&results)
        .handle(|body: String| async move {
            if body == "bad" {
                return Err(std::io::Error::other("cannot invoice"));
            }
            Ok(format!("invoice {body}"))
        });
    // Its own group and policy win over the routers' (and AckFirst takes no retry budget nor dead letter).
    let own_group = common::unique("own-group");
    inner
        .subscriber("audit")
        .name("inner-audit")
        .group_id(&own_group)
        .auto_commit(true)
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .handle(|_: String| async { Err::<(), _>(std::io::Error::other("fails, acked anyway")) });
    outer.include_router(inner);
    broker.include_router(outer);
    assert_eq!(results.topic(), format!("{base}.billing.invoiced"));

    let (orders, audit, dlt) = (
        format!("{base}.billing.orders"),
        format!("{base}.billing.audit"),
        format!("{base}.dlt"),
    );
    for t in [&orders, &audit, &dlt, &results.topic()] {
        broker.create_topic(t, 1).await.unwrap();
    }
    let (invoices, dead) = (Inbox::default(), Inbox::default());
    record_into(&broker, &results.topic(), "invoices", &invoices);
    record_into(&broker, &dlt, "dead", &dead);
    let app = common::start(&broker).await;

    broker.publish("o-1", &orders).await.unwrap();
    broker.publish("bad", &orders).await.unwrap();
    broker.publish("a-1", &audit).await.unwrap();
    observer.wait_handled("invoices", 1, common::WAIT).await.unwrap();
    observer.wait_handled("dead", 1, common::WAIT).await.unwrap();
    observer.wait_handled("inner-audit", 1, common::WAIT).await.unwrap();
    let settled = observer.wait_settled("inner-audit", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    assert_eq!(invoices.all()[0].payload, "invoice o-1");
    // The router's retry budget (2 attempts) and dead letter applied to the inner router's subscriber.
    let dead = dead.all();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, "bad");
    assert_eq!(dead[0].header(ferrostream::retry::headers::ATTEMPTS), Some("2"));
    assert_eq!(
        dead[0].header(ferrostream::retry::headers::SOURCE_TOPIC),
        Some(orders.as_str())
    );
    // The audit subscriber kept its own policy: acked on receipt, the failure not retried.
    assert_eq!((settled[0].settle, settled[0].by), (Settle::Ack, SettledBy::Receipt));
    assert_eq!(observer.handled("inner-audit").len(), 1);
    if common::is_log() {
        let committed = broker.committed_offsets(&own_group, &audit).await.unwrap();
        assert_eq!(committed.get(&0), Some(&1), "audit committed in its own group");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_runs_broker_then_router_then_subscriber_in_the_order_added() {
    common::init_tracing();
    let trail = Trail::default();
    let broker = common::broker()
        .layer(tracer(&trail, "broker1"))
        .layer(tracer(&trail, "broker2"));
    let observer = broker.observer();
    let router = Router::new("").layer(tracer(&trail, "router"));
    let topic = common::topic(&broker, "mw-order", 1).await;
    let t = trail.clone();
    router
        .subscriber(&topic)
        .name("ordered")
        .group_id(common::unique("g"))
        .auto_commit(false)
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .layer(tracer(&trail, "sub1"))
        .layer(tracer(&trail, "sub2"))
        .handle(move |_: String| {
            let t = t.clone();
            async move { t.push("handler") }
        });
    broker.include_router(router);
    let app = common::start(&broker).await;
    broker.publish("x", &topic).await.unwrap();
    observer.wait_settled("ordered", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        trail.all(),
        [
            "broker1>", "broker2>", "router>", "sub1>", "sub2>", "handler", "<sub2", "<sub1", "<router", "<broker2",
            "<broker1"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_may_short_circuit_settle_and_transform_payload_and_result() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "mw-tf", 1).await;
    let out = common::topic(&broker, "mw-tf-out", 1).await;
    let calls = Trail::default();
    let c = calls.clone();
    common::member(&broker, &topic, "transformed", &common::unique("g"))
        .auto_commit(false)
        .publish_to(out.as_str())
        .layer(middleware::from_fn(|mut req: Request, next: Next| async move {
            match req.message().headers().get_str("mode") {
                // Short-circuit: the handler never runs; the policy acks.
                Some("skip") => return Ok(None),
                // Settles the message itself, then skips the handler.
                Some("reject") => {
                    req.message().reject().await;
                    return Ok(None);
                }
                _ => {}
            }
            // The handler decodes the transformed payload; the result gets a header and a new body.
            let upper = req.payload().to_ascii_uppercase();
            req.set_payload(upper);
            let mut result = next.run(req).await?;
            if let Some(r) = &mut result {
                let body = format!("[{}]", text(r.payload().unwrap()));
                r.set_payload(body);
                r.headers_mut().insert("via", "middleware");
            }
            Ok(result)
        }))
        .handle(move |body: String, msg: Message| {
            let c = c.clone();
            async move {
                c.push(body.clone());
                // The message handle keeps the original payload.
                format!("{body}/{}", text(msg.payload()))
            }
        });
    let results = Inbox::default();
    record_into(&broker, &out, "results", &results);
    let app = common::start(&broker).await;
    broker.publish("one", &topic).header("mode", "skip").await.unwrap();
    broker.publish("two", &topic).header("mode", "reject").await.unwrap();
    broker.publish("three", &topic).await.unwrap();
    let settled = observer.wait_settled("transformed", 3, common::WAIT).await.unwrap();
    observer.wait_handled("results", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    assert_eq!(settled.len(), 3);
    let of = |p: &str| common::settles_of_payload(&observer, "transformed", p);
    assert_eq!(of("one"), [(Settle::Ack, SettledBy::Policy)]);
    assert_eq!(of("two"), [(Settle::Reject, SettledBy::User)]);
    assert_eq!(of("three"), [(Settle::Ack, SettledBy::Policy)]);
    assert_eq!(
        calls.all(),
        ["THREE"],
        "only the third reached the handler, transformed"
    );
    let results = results.all();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].payload, "[THREE/three]");
    assert_eq!(results[0].header("via"), Some("middleware"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_layers_compose_a_timeout_fails_the_call_and_a_concurrency_limit_holds() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let slow = common::topic(&broker, "mw-timeout", 1).await;
    common::member(&broker, &slow, "timed", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(1))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(50)))
        .handle(|body: String| async move {
            if body == "slow" {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });

    // Eight at once are allowed by max_in_flight, two by the limit layer.
    let limited = common::topic(&broker, "mw-limit", 1).await;
    let (now, peak) = (Arc::new(Mutex::new(0usize)), Arc::new(Mutex::new(0usize)));
    let (n, p) = (now.clone(), peak.clone());
    common::member(&broker, &limited, "limited", &common::unique("g"))
        .auto_commit(false)
        .max_in_flight(8)
        .layer(tower::limit::ConcurrencyLimitLayer::new(2))
        .handle(move |_: String| {
            let (n, p) = (n.clone(), p.clone());
            async move {
                {
                    let mut n = n.lock().unwrap();
                    *n += 1;
                    let mut p = p.lock().unwrap();
                    *p = (*p).max(*n);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                *n.lock().unwrap() -= 1;
            }
        });
    let app = common::start(&broker).await;
    broker.publish("slow", &slow).await.unwrap();
    broker.publish("fast", &slow).await.unwrap();
    for i in 0..16 {
        // Keys spread the messages over lanes, so up to eight run at once without the limit.
        broker
            .publish(format!("m{i}"), &limited)
            .key(format!("k{i}"))
            .await
            .unwrap();
    }
    let settled = observer.wait_settled("timed", 2, common::WAIT).await.unwrap();
    observer.wait_settled("limited", 16, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    assert_eq!(settled.len(), 2);
    assert_eq!(
        common::settles_of_payload(&observer, "timed", "slow"),
        [(Settle::Reject, SettledBy::Policy)],
        "the timed-out call failed and its budget of 1 was spent"
    );
    let handled = observer.handled("timed");
    let (_, _, _, outcome) = handled.iter().find(|h| h.2 == "slow").unwrap();
    assert!(
        matches!(outcome, Outcome::Failed { message, .. } if message.contains("timed out")),
        "{outcome:?}"
    );
    assert_eq!(
        common::settles_of_payload(&observer, "timed", "fast"),
        [(Settle::Ack, SettledBy::Policy)]
    );
    assert_eq!(*peak.lock().unwrap(), 2, "the concurrency limit layer held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_middleware_wraps_every_publish_broker_first_and_subscriber_ones_only_its_own() {
    common::init_tracing();
    let tag = |name: &'static str| {
        middleware::publish_from_fn(move |mut out: Outgoing, next: PublishNext| async move {
            let seen = out.headers().get_str("trail").unwrap_or("").to_owned();
            out.headers_mut().set("trail", format!("{seen}{name};"));
            next.run(out).await
        })
    };
    let broker = common::broker().publish_layer(tag("broker"));
    let observer = broker.observer();
    let topic = common::topic(&broker, "pmw", 1).await;
    let out = common::topic(&broker, "pmw-out", 1).await;
    common::member(&broker, &topic, "tagger", &common::unique("g"))
        .auto_commit(false)
        .publish_to(out.as_str())
        .publish_layer(tag("subscriber"))
        .handle(|body: String| async move { format!("result of {body}") });
    let outputs = Inbox::default();
    record_into(&broker, &out, "outputs", &outputs);
    let app = common::start(&broker).await;
    broker.publish("direct", &out).await.unwrap();
    broker.publish("x", &topic).await.unwrap();
    observer.wait_handled("outputs", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let all = outputs.all();
    let direct = all.iter().find(|s| s.payload == "direct").unwrap();
    assert_eq!(direct.header("trail"), Some("broker;"));
    let result = all.iter().find(|s| s.payload == "result of x").unwrap();
    assert_eq!(result.header("trail"), Some("broker;subscriber;"));

    // A failing publish middleware is a typed error.
    let refusing = common::broker().publish_layer(middleware::publish_from_fn(|_: Outgoing, _: PublishNext| async {
        Err(ferrostream::PublishError::Refused {
            reason: "by policy".into(),
        })
    }));
    let err = refusing.publish("x", &topic).await.unwrap_err();
    assert!(matches!(err, ferrostream::PublishError::Refused { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_carry_defaults_and_a_handler_publishes_to_several_with_its_own_key_and_headers() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "pubs", 1).await;
    let (a, b, audit_topic) = (
        common::topic(&broker, "pubs-a", 1).await,
        common::topic(&broker, "pubs-b", 1).await,
        common::topic(&broker, "pubs-audit", 1).await,
    );
    let to_a = broker
        .publisher(&a)
        .header("dest", "a")
        .header("shared", "from-publisher");
    let to_b = broker.publisher(&b).key("b-default-key");
    let audit = broker.publisher(&audit_topic).key("audit").header("service", "billing");
    let broker = broker.with_state(audit.clone());
    common::member(&broker, &topic, "multi", &common::unique("g"))
        .auto_commit(false)
        .publish_to(&to_a)
        .publish_to(to_b.clone())
        .handle(|body: String, State(audit): State<Publisher>| async move {
            audit.publish(format!("saw {body}")).header("extra", "1").await?;
            let response = Response::new(format!("out {body}")).header("shared", "from-response");
            Ok::<_, ferrostream::PublishError>(if body == "keyed" {
                response.key("own-key")
            } else {
                response
            })
        });
    let (ins_a, ins_b, ins_audit) = (Inbox::default(), Inbox::default(), Inbox::default());
    record_into(&broker, &a, "ra", &ins_a);
    record_into(&broker, &b, "rb", &ins_b);
    record_into(&broker, &audit_topic, "raudit", &ins_audit);
    let app = common::start(&broker).await;
    broker.publish("plain", &topic).key("in-key").await.unwrap();
    broker.publish("keyed", &topic).await.unwrap();
    for r in ["ra", "rb", "raudit"] {
        observer.wait_handled(r, 2, common::WAIT).await.unwrap();
    }
    app.shutdown().await.unwrap();

    assert_eq!(broker.publisher_topics(), [a.clone(), b.clone(), audit_topic.clone()]);
    let find = |inbox: &Inbox, payload: &str| inbox.all().into_iter().find(|s| s.payload == payload).unwrap();
    let plain_a = find(&ins_a, "out plain");
    assert_eq!(plain_a.header("dest"), Some("a"));
    assert_eq!(
        plain_a.header("shared"),
        Some("from-response"),
        "the response's header wins"
    );
    assert_eq!(plain_a.key.as_deref(), Some("in-key"), "by default the incoming key");
    assert_eq!(find(&ins_a, "out keyed").key.as_deref(), Some("own-key"));
    // The response's key wins over the publisher's default key, which wins over none.
    assert_eq!(find(&ins_b, "out keyed").key.as_deref(), Some("own-key"));
    assert_eq!(find(&ins_b, "out plain").key.as_deref(), Some("in-key"));
    let audited = find(&ins_audit, "saw plain");
    assert_eq!(audited.key.as_deref(), Some("audit"));
    assert_eq!(audited.header("service"), Some("billing"));
    assert_eq!(audited.header("extra"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_publisher_refuses_to_publish_until_included() {
    let router = Router::new("pre.");
    let early = router.publisher("events");
    let err = early.publish("x").await.unwrap_err();
    assert!(matches!(err, ferrostream::PublishError::NotIncluded { .. }), "{err}");
    assert!(err.to_string().contains("include_router"), "{err}");
    let broker = Broker::new("memory://").unwrap();
    broker.include_router(router);
    let ack = early.publish("x").await.unwrap();
    assert_eq!(ack.topic, "pre.events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_choose_the_handler_and_a_message_no_filter_accepts_is_rejected_to_the_dead_letter_topic() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "filters", 1).await;
    let dlt = common::topic(&broker, "filters-dlt", 1).await;
    let fallback_topic = common::topic(&broker, "filters-fb", 1).await;
    let calls = Trail::default();
    let kind = |k: &'static str| move |m: &Message| m.headers().get_str("kind") == Some(k);
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    common::member(&broker, &topic, "filtered", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .dead_letter(dlt.as_str())
        .when(kind("created"), move |body: String| {
            let c = c1.clone();
            async move { c.push(format!("created:{body}")) }
        })
        .when(kind("paid"), move |body: String| {
            let c = c2.clone();
            async move { c.push(format!("paid:{body}")) }
        })
        .otherwise_reject();
    common::member(&broker, &fallback_topic, "with-fallback", &common::unique("g"))
        .auto_commit(false)
        .when(kind("created"), |_: String| async {})
        .handle(move |body: String| {
            let c = c3.clone();
            async move { c.push(format!("fallback:{body}")) }
        });
    let dead = Inbox::default();
    record_into(&broker, &dlt, "dead", &dead);
    let app = common::start(&broker).await;
    broker.publish("1", &topic).header("kind", "created").await.unwrap();
    broker.publish("2", &topic).header("kind", "paid").await.unwrap();
    broker.publish("3", &topic).header("kind", "refunded").await.unwrap();
    broker
        .publish("4", &fallback_topic)
        .header("kind", "other")
        .await
        .unwrap();
    let settled = observer.wait_settled("filtered", 3, common::WAIT).await.unwrap();
    observer.wait_settled("with-fallback", 1, common::WAIT).await.unwrap();
    observer.wait_handled("dead", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let mut seen = calls.all();
    seen.sort();
    assert_eq!(seen, ["created:1", "fallback:4", "paid:2"]);
    assert_eq!(settled.len(), 3);
    assert_eq!(
        common::settles_of_payload(&observer, "filtered", "3"),
        [(Settle::Reject, SettledBy::Interrupt)]
    );
    let dead = dead.all();
    assert_eq!(dead[0].payload, "3");
    assert_eq!(
        dead[0].header(ferrostream::retry::headers::ERROR),
        Some("no filter of the subscriber accepts the message")
    );
}

#[tokio::test]
async fn filters_on_a_batch_subscriber_are_refused_at_start() {
    let broker = Broker::new("memory://").unwrap();
    broker
        .subscriber("t")
        .group_id("g")
        .auto_commit(false)
        .batch(10, Duration::from_millis(10))
        .when(|_| true, |_: ferrostream::Batch<String>| async {})
        .otherwise_reject();
    let Err(err) = ferrostream::App::new(broker).start().await else {
        panic!("a batch subscriber with filters started");
    };
    assert!(err.to_string().contains("filters"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_router_retry_and_dead_letter_apply_when_the_policy_comes_from_an_outer_router() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let base = common::unique("nest");
    let outer = Router::new(format!("{base}."))
        .group_id(common::unique("g"))
        .ack_policy(AckPolicy::NackOnError);
    let inner = Router::new("in.")
        .retry(RetryPolicy::new(2).backoff(Duration::from_millis(5), Duration::from_millis(5)))
        .dead_letter("dlt");
    inner
        .subscriber("work")
        .name("nested-work")
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .handle(|_: String| async { Err::<(), _>(std::io::Error::other("always fails")) });
    outer.include_router(inner);
    broker.include_router(outer);
    let (work, dlt) = (format!("{base}.in.work"), format!("{base}.in.dlt"));
    for t in [&work, &dlt] {
        broker.create_topic(t, 1).await.unwrap();
    }
    let dead = Inbox::default();
    record_into(&broker, &dlt, "nested-dead", &dead);
    let app = common::start(&broker).await;
    broker.publish("x", &work).await.unwrap();
    observer.wait_handled("nested-dead", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        observer.handled("nested-work").len(),
        2,
        "the inner router's budget of 2 attempts"
    );
    assert_eq!(dead.all()[0].header(ferrostream::retry::headers::ATTEMPTS), Some("2"));
}

#[tokio::test]
async fn a_start_that_fails_keeps_every_declaration_for_the_next_try() {
    #[derive(Clone)]
    struct Db;
    let broker = Broker::new("memory://").unwrap();
    let observer = broker.observer();
    let router = Router::new("r.").group_id("g").auto_commit(false);
    router
        .subscriber("a")
        .handle(|_: String, State(_db): State<Db>| async {});
    broker.include_router(router);
    broker
        .subscriber("b")
        .group_id("g")
        .auto_commit(false)
        .handle(|_: String| async {});
    let Err(err) = ferrostream::App::new(broker.clone()).start().await else {
        panic!("started without the state its handler needs");
    };
    assert!(
        matches!(
            err,
            ferrostream::StartError::Config(ferrostream::ConfigError::MissingState { .. })
        ),
        "{err}"
    );
    let broker = broker.with_state(Db);
    let app = ferrostream::App::new(broker.clone()).start().await.unwrap();
    broker.publish("1", "r.a").await.unwrap();
    broker.publish("2", "b").await.unwrap();
    observer.wait_finished("r.a@g", 1, common::WAIT).await.unwrap();
    observer.wait_finished("b@g", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    // Declaring a publisher again does not list it twice.
    let _ = broker.publisher("audit");
    let _ = broker.publisher("audit").key("k");
    assert_eq!(broker.publisher_topics(), ["audit"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_publish_middleware_fails_the_call_and_the_subscriber_keeps_running() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "pmw-panic", 1).await;
    let out = common::topic(&broker, "pmw-panic-out", 1).await;
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p = panicked.clone();
    common::member(&broker, &topic, "panicky", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(3).backoff(Duration::from_millis(5), Duration::from_millis(5)))
        .publish_to(out.as_str())
        .publish_layer(middleware::publish_from_fn(move |o: Outgoing, next: PublishNext| {
            let first = !p.swap(true, std::sync::atomic::Ordering::SeqCst);
            async move {
                if first {
                    panic!("publish middleware bug");
                }
                next.run(o).await
            }
        }))
        .handle(|body: String| async move { format!("r-{body}") });
    let results = Inbox::default();
    record_into(&broker, &out, "panic-results", &results);
    let app = common::start(&broker).await;
    broker.publish("1", &topic).await.unwrap();
    broker.publish("2", &topic).await.unwrap();
    observer.wait_finished("panicky", 2, common::WAIT).await.unwrap();
    observer.wait_handled("panic-results", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let handled = observer.handled("panicky");
    assert!(
        matches!(
            &handled[0].3,
            Outcome::Failed {
                kind: ferrostream::FailureKind::Panic,
                ..
            }
        ),
        "{handled:?}"
    );
    let mut got: Vec<_> = results.all().into_iter().map(|s| s.payload).collect();
    got.sort();
    assert_eq!(got, ["r-1", "r-2"]);
}
