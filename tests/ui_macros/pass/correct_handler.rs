// A correct handler with the attribute compiles, is registered as usual and behaves as without it.
use std::time::Duration;

use ferrostream::{App, Batch, Broker, Json, Message, Settle, State, debug_handler};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    id: u64,
}

#[derive(Clone)]
struct Prefix(&'static str);

#[debug_handler]
async fn my_handler(
    Json(order): Json<Order>,
    State(prefix): State<Prefix>,
    msg: Message,
) -> Result<Option<String>, ferrostream::Error> {
    msg.ack().await;
    Ok(Some(format!("{} {}", prefix.0, order.id)))
}

#[debug_handler]
pub async fn batch_handler(Batch(bodies): Batch<String>, messages: Batch<Message>) -> Json<Vec<usize>> {
    messages.ack_all().await;
    Json(bodies.iter().map(String::len).collect())
}

#[debug_handler]
async fn no_arguments() {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::new("memory://")?.with_state(Prefix("order"));
    let observer = broker.observer();
    broker.subscriber("t").group_id("g").handle(my_handler);
    broker.subscriber("unused").group_id("g").handle(no_arguments);
    let _ = batch_handler;
    let app = App::new(broker.clone()).start().await?;
    broker.publish(r#"{"id": 7}"#, "t").await?;
    let settled = observer.wait_settled("t@g", 1, Duration::from_secs(5)).await?;
    assert_eq!(settled[0].settle, Settle::Ack);
    app.shutdown().await?;
    Ok(())
}
