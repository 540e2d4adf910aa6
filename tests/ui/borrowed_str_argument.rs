// `&str` cannot outlive the message: handlers take owned values.
fn main() {
    let broker = ferrostream::Broker::new("memory://").unwrap();
    broker.subscriber("orders").handle(|body: &'static str| async move {
        let _ = body;
    });
}
