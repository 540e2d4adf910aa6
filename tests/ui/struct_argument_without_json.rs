// A payload struct taken directly instead of through `Json<..>`.
#[derive(serde::Deserialize)]
struct Order {
    id: u32,
}

fn main() {
    let broker = ferrostream::Broker::new("memory://").unwrap();
    broker.subscriber("orders").handle(|order: Order| async move {
        let _ = order.id;
    });
}
