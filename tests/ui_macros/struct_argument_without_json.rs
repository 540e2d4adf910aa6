// A payload struct taken directly instead of through `Json<..>`: the error points at `Order`, not at
// the other, correct arguments.
use ferrostream::{Message, debug_handler};

#[derive(serde::Deserialize)]
struct Order {
    id: u32,
}

#[debug_handler]
async fn on_order(body: String, order: Order, msg: Message) {
    let _ = (body, order.id, msg);
}

fn main() {}
