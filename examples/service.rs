//! A shop service as you would deploy it: typed JSON payloads with schemas, a router, request/reply, and
//! the command line every ferrostream service gains with `run_cli` (feature `cli`).
//!
//! ```text
//! cargo run --features cli --example service -- docs serve          # the docs page: http://127.0.0.1:8000/docs
//! cargo run --features cli --example service -- docs gen --yaml     # the AsyncAPI document
//! cargo run --features cli --example service                        # runs it (in-memory broker) until Ctrl-C
//! cargo run --features cli,kafka --example service -- --broker kafka://127.0.0.1:9092
//! cargo run --features cli,kafka --example service -- --broker kafka://127.0.0.1:9092 \
//!     publish shop.orders '{"id": 1, "items": [{"sku": "tea", "quantity": 2}]}'
//! cargo run --features cli --example service -- --help
//! ```

use std::process::ExitCode;

use ferrostream::{AckPolicy, App, Broker, Json, RetryPolicy, Router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An order placed in the shop.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Order {
    /// The order's number, unique in the shop.
    id: u64,
    /// What was ordered.
    items: Vec<Item>,
    /// A coupon code, if the customer gave one.
    #[serde(default)]
    coupon: Option<String>,
}

/// One line of an order.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Item {
    /// The product's stock-keeping unit.
    sku: String,
    /// How many.
    quantity: u32,
}

/// What a customer pays for an order.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Invoice {
    /// The order it bills.
    order: u64,
    /// The amount, in cents.
    amount_cents: u64,
}

/// A question to the price service.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct PriceQuery {
    /// The product's stock-keeping unit.
    sku: String,
}

/// The price service's answer.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Price {
    /// The product's stock-keeping unit.
    sku: String,
    /// Its unit price, in cents.
    cents: u64,
}

fn unit_price(sku: &str) -> u64 {
    100 * sku.len() as u64
}

#[tokio::main]
async fn main() -> ExitCode {
    // The URL in code is the default; `--broker URL` or FERROSTREAM_BROKER replace it.
    let broker = match Broker::new("memory://") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };

    // Every subscriber of the router is at least once, retries twice, then dead-letters.
    let shop = Router::new("shop.")
        .group_id("shop")
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(3))
        .dead_letter("dead-letters");

    shop.subscriber("orders")
        .name("billing")
        .description("Bills each order and publishes its invoice to shop.invoices.")
        .create_topic(4)
        .publish_to("invoices") // names in a router are relative: shop.invoices
        .handle(|Json(order): Json<Order>| async move {
            let amount_cents = order
                .items
                .iter()
                .map(|i| unit_price(&i.sku) * u64::from(i.quantity))
                .sum();
            tracing::info!(order = order.id, amount_cents, "billed");
            Json(Invoice {
                order: order.id,
                amount_cents,
            })
        });

    shop.subscriber("invoices")
        .name("bookkeeping")
        .description("Books every invoice.")
        .create_topic(1)
        .handle(|Json(invoice): Json<Invoice>| async move {
            tracing::info!(order = invoice.order, amount_cents = invoice.amount_cents, "booked");
        });

    shop.subscriber("prices")
        .name("pricing")
        .description("Answers price requests (request/reply): send a PriceQuery with a reply_to header.")
        .create_topic(1)
        .handle(|Json(q): Json<PriceQuery>| async move {
            Json(Price {
                cents: unit_price(&q.sku),
                sku: q.sku,
            })
        });

    shop.subscriber("dead-letters")
        .name("dead-letter-log")
        .description("Logs what the other subscribers gave up on.")
        .create_topic(1)
        .handle(|body: String| async move {
            tracing::warn!(%body, "dead letter");
        });

    let _audit = shop
        .publisher("audit")
        .description("Notable events, for the audit trail.");
    broker.include_router(shop);

    App::new(broker)
        .title("shop")
        .version(env!("CARGO_PKG_VERSION"))
        .description("Bills orders and answers price requests.")
        .run_cli()
        .await
}
