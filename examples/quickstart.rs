//! The first thing to run: four subscribers showing each acknowledgement style, then what happened to
//! every message (handled, how it was settled, the committed offset per partition, or on RabbitMQ what
//! is left in the queue).
//!
//! ```text
//! cargo run --example quickstart                                   # in-memory broker
//! cargo run --features kafka --example quickstart -- --broker kafka://127.0.0.1:9092
//! FERROSTREAM_BROKER=kafka://127.0.0.1:9092 cargo run --features kafka --example quickstart
//! cargo run --features amqp --example quickstart -- --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use ferrostream::observe::{Event, Outcome};
use ferrostream::{AckMessage, AckPolicy, App, Broker, Message, OffsetReset, SettledBy};

#[derive(Parser)]
#[command(about = "ferrostream quickstart: acknowledgement styles, side by side")]
struct Args {
    /// Broker URL: memory://, kafka://host:port or amqp://user:password@host:port/vhost.
    #[arg(long, env = "FERROSTREAM_BROKER", default_value = "memory://")]
    broker: String,
}

/// Business logic several calls deep can stop the handler and settle the message (the seed's example).
fn smth_processing(body: &str) -> Result<(), ferrostream::Error> {
    if body.starts_with("duplicate") {
        Err(AckMessage)?; // nothing to do: ack it and stop here
    }
    Ok(())
}

#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<String, usize>>>);

impl Attempts {
    fn next(&self, body: &str) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(body.to_owned()).or_default();
        *n += 1;
        *n
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Handler errors and panics are logged (SPEC 2.5); RUST_LOG=info shows assignments and commits too.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let attempts = Attempts::default();
    let broker = Broker::new(&args.broker)?.with_state(attempts.clone());
    let observer = broker.observer();
    println!("ferrostream quickstart on {}\n", broker.url());
    // Where a message sits: its offset on a log, its delivery tag on RabbitMQ.
    let position = if broker.url().starts_with("amqp://") {
        "tag"
    } else {
        "offset"
    };

    // Topics and groups are fresh on every run, so reruns against a real broker start clean.
    let t = |name: &str| format!("quickstart.{name}.{run}");
    let (amo, alo, manual, nested) = (t("at-most-once"), t("at-least-once"), t("manual"), t("nested"));
    for topic in [&amo, &alo, &manual, &nested] {
        broker.create_topic(topic, 1).await?;
    }
    let group = format!("quickstart-{run}");

    // 1. At most once (the Kafka default, auto_commit = true): committed before the handler runs, so a
    //    failure is never retried.
    broker
        .subscriber(&amo)
        .name("at-most-once")
        .group_id(&group)
        .auto_commit(true)
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(|body: String| async move {
            if body == "boom" {
                return Err(ferrostream::Error::handler(std::io::Error::other(
                    "boom is not a valid order",
                )));
            }
            Ok(())
        });

    // 2. At least once (group + auto_commit(false)): acked on success; on error the offset is not committed
    //    and the message comes back.
    broker
        .subscriber(&alo)
        .name("at-least-once")
        .group_id(&group)
        .auto_commit(false)
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(
            |body: String, ferrostream::State(attempts): ferrostream::State<Attempts>| async move {
                if body == "flaky" && attempts.next(&body) == 1 {
                    return Err(ferrostream::Error::handler(std::io::Error::other(
                        "downstream timed out",
                    )));
                }
                Ok(())
            },
        );

    // 3. Manual: only the handler settles.
    broker
        .subscriber(&manual)
        .name("manual")
        .group_id(&group)
        .ack_policy(AckPolicy::Manual)
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(
            |body: String, msg: Message, ferrostream::State(attempts): ferrostream::State<Attempts>| async move {
                let _ = match body.as_str() {
                    "retry" if attempts.next("manual-retry") == 1 => msg.nack().await,
                    "bad" => msg.reject().await,
                    _ => msg.ack().await,
                };
            },
        );

    // 4. AckMessage from a nested function, under at-least-once.
    broker
        .subscriber(&nested)
        .name("nested-ack")
        .group_id(&group)
        .auto_commit(false)
        .auto_offset_reset(OffsetReset::Earliest)
        .handle(|body: String| async move {
            smth_processing(&body)?;
            println!("  (nested-ack) processing {body:?}");
            Ok::<_, ferrostream::Error>(())
        });

    let app = App::new(broker.clone()).start().await?;
    for body in ["hello", "boom", "world"] {
        broker.publish(body, &amo).await?;
    }
    for body in ["first", "flaky", "last"] {
        broker.publish(body, &alo).await?;
    }
    for body in ["ok", "retry", "bad"] {
        broker.publish(body, &manual).await?;
    }
    for body in ["new order", "duplicate order"] {
        broker.publish(body, &nested).await?;
    }

    // Wait until every message reached its final settle (the nacked ones settle twice).
    let expected = [
        ("at-most-once", 3),
        ("at-least-once", 4),
        ("manual", 4),
        ("nested-ack", 2),
    ];
    for (name, n) in expected {
        observer.wait_settled(name, n, Duration::from_secs(30)).await?;
    }
    app.shutdown().await?;

    for (name, topic) in [
        ("at-most-once", &amo),
        ("at-least-once", &alo),
        ("manual", &manual),
        ("nested-ack", &nested),
    ] {
        println!("== {name}  (topic {topic})");
        for event in observer.events() {
            match event {
                Event::Handled {
                    subscriber,
                    offset,
                    payload,
                    outcome,
                    ..
                } if &*subscriber == name => {
                    let outcome = match outcome {
                        Outcome::Ok => "ok".to_owned(),
                        Outcome::Interrupted(s) => format!("interrupted: {s}"),
                        Outcome::Failed { kind, message } => format!("{kind} error: {message}"),
                    };
                    println!("  {position} {offset:>2}  {payload:<16} handled  -> {outcome}");
                }
                Event::Settled {
                    subscriber,
                    offset,
                    settle,
                    by,
                    ..
                } if &*subscriber == name => {
                    let by = match by {
                        SettledBy::Receipt => "on receipt, before the handler",
                        SettledBy::User => "by the handler",
                        SettledBy::Interrupt => "by an interrupt",
                        SettledBy::Policy => "by the ack policy",
                    };
                    println!("  {position} {offset:>2}  {:<16} settled  -> {settle} ({by})", "");
                }
                _ => {}
            }
        }
        match broker.committed_offsets(&group, topic).await {
            Ok(committed) => {
                let shown: Vec<String> = committed.iter().map(|(p, o)| format!("partition {p}: {o}")).collect();
                println!("  committed: {}\n", shown.join(", "));
            }
            // A queue (RabbitMQ) keeps no offsets: what is not settled is back in the queue.
            Err(ferrostream::AdminError::Unsupported { .. }) => {
                println!("  left in the queue: {}\n", broker.queue_depth(topic).await?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
