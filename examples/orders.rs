//! An order service built with the application layer: a router with shared defaults, middleware,
//! publishers, filters, request/reply and lifecycle hooks. It runs a small workload, checks what
//! happened and exits non-zero if anything is not as shown.
//!
//! ```text
//! cargo run --example orders                                   # in-memory broker
//! cargo run --features kafka --example orders -- --broker kafka://127.0.0.1:9092
//! cargo run --features amqp --example orders -- --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use ferrostream::middleware::{self, Next, Outgoing, PublishNext, Request};
use ferrostream::{
    AckPolicy, App, Broker, Json, Message, OffsetReset, Publisher, Response, RetryPolicy, Router, Settle, State,
};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "ferrostream orders: routers, middleware, publishers, filters, request/reply, hooks")]
struct Args {
    /// Broker URL: memory://, kafka://host:port or amqp://user:password@host:port/vhost.
    #[arg(long, env = "FERROSTREAM_BROKER", default_value = "memory://")]
    broker: String,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Order {
    id: u64,
    items: Vec<String>,
    total_cents: u64,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Invoice {
    order: u64,
    amount_cents: u64,
}

/// Handler calls seen by the timing middleware.
#[derive(Clone, Default)]
struct Calls(Arc<AtomicU64>);

fn price_of(item: &str) -> u64 {
    100 * item.len() as u64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let calls = Calls::default();

    // Middleware on the broker: every handler call is counted and timed; every publish is tagged.
    let counted = calls.clone();
    let broker = Broker::new(&args.broker)?
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let counted = counted.clone();
            async move {
                counted.0.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let result = next.run(req).await;
                tracing::debug!(elapsed = ?started.elapsed(), ok = result.is_ok(), "handler call");
                result
            }
        }))
        .publish_layer(middleware::publish_from_fn(
            |mut out: Outgoing, next: PublishNext| async move {
                out.headers_mut().set("service", "orders-example");
                next.run(out).await
            },
        ));
    let observer = broker.observer();
    println!("ferrostream orders example on {}\n", broker.url());

    // One router for the order domain: every topic under `orders.<run>.`, one group, at least once with
    // three attempts, then the dead-letter topic.
    let prefix = format!("orders.{run}.");
    let orders = Router::new(&prefix)
        .group_id(format!("orders-example-{run}"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(3).backoff(Duration::from_millis(10), Duration::from_millis(50)))
        .dead_letter("dlt");
    let invoices = orders.publisher("invoices").header("schema", "invoice-v1");
    let audit = orders.publisher("audit");

    // Filters: one subscriber, a handler per kind of event; an unknown kind goes to the dead letter.
    let kind = |k: &'static str| move |m: &Message| m.headers().get_str("kind") == Some(k);
    orders
        .subscriber("events")
        .auto_offset_reset(OffsetReset::Earliest)
        .publish_to(&invoices)
        .when(kind("created"), |Json(order): Json<Order>| async move {
            let invoice = Invoice {
                order: order.id,
                amount_cents: order.total_cents,
            };
            Response::new(Json(invoice)).key(order.id.to_string())
        })
        .when(
            kind("cancelled"),
            |Json(order): Json<Order>, State(audit): State<Publisher>| async move {
                audit.publish(format!("order {} cancelled", order.id)).await?;
                Ok::<_, ferrostream::PublishError>(None::<String>)
            },
        )
        .otherwise_reject();

    // Request/reply: a quote for a list of items.
    orders
        .subscriber("quote")
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(|Json(items): Json<Vec<String>>| async move { Json(items.iter().map(|i| price_of(i)).sum::<u64>()) });

    // The dead letters and invoices, read back to show what happened.
    orders
        .subscriber("dlt")
        .name("dead-letters")
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(|body: String, msg: Message| async move {
            let error = msg
                .headers()
                .get_str(ferrostream::retry::headers::ERROR)
                .unwrap_or("?")
                .to_owned();
            println!("  dead letter: {body} ({error})");
        });
    orders
        .subscriber("invoices")
        .name("invoice-reader")
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(|Json(invoice): Json<Invoice>, msg: Message| async move {
            let tagged = msg.headers().get_str("service").unwrap_or("-").to_owned();
            println!(
                "  invoice for order {}: {} cents (tagged by {tagged})",
                invoice.order, invoice.amount_cents
            );
        });

    broker.include_router(orders);
    let broker = broker.with_state(audit.clone());
    let topic = |name: &str| format!("{prefix}{name}");
    for name in ["events", "quote", "dlt", "invoices", "audit"] {
        broker.create_topic(&topic(name), 1).await?;
    }

    let audit_topic = audit.topic();
    let app = App::new(broker.clone())
        .on_startup(|_broker| async { Ok::<_, std::io::Error>(()) })
        .after_startup(move |broker| {
            let audit_topic = audit_topic.clone();
            async move { broker.publish("service started", &audit_topic).await.map(|_| ()) }
        })
        .start()
        .await?;

    // Request/reply: the quote comes back to this broker handle's own reply topic.
    let quote = broker
        .request(Json(vec!["book", "pen"]), &topic("quote"))
        .timeout(Duration::from_secs(30))
        .await?;
    let cents: u64 = serde_json::from_slice(quote.payload())?;
    println!("quote for [book, pen]: {cents} cents");

    let order = |id, items: &[&str]| Order {
        id,
        items: items.iter().map(|s| s.to_string()).collect(),
        total_cents: items.iter().map(|i| price_of(i)).sum(),
    };
    let events = topic("events");
    broker
        .publish(Json(order(1, &["book"])), &events)
        .header("kind", "created")
        .await?;
    broker
        .publish(Json(order(2, &["pen"])), &events)
        .header("kind", "cancelled")
        .await?;
    broker
        .publish(Json(order(3, &["lamp"])), &events)
        .header("kind", "refunded")
        .await?;

    observer
        .wait_finished("invoice-reader", 1, Duration::from_secs(30))
        .await?;
    observer
        .wait_finished("dead-letters", 1, Duration::from_secs(30))
        .await?;
    let events_name = format!("{events}@orders-example-{run}");
    let finished = observer.wait_finished(&events_name, 3, Duration::from_secs(30)).await?;
    app.shutdown().await?;

    let rejected = finished.iter().filter(|m| m.settle == Settle::Reject).count();
    println!(
        "\n{} handler calls through the middleware; events: {} acked, {rejected} dead-lettered",
        calls.0.load(Ordering::Relaxed),
        finished.len() - rejected
    );
    let expected_quote = price_of("book") + price_of("pen");
    if cents != expected_quote || rejected != 1 || finished.len() != 3 {
        return Err(format!("unexpected outcome: quote {cents} (expected {expected_quote}), {finished:?}").into());
    }
    Ok(())
}
