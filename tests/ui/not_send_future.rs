// An `Rc` held across an `.await` makes the future `!Send`.
fn main() {
    let broker = ferrostream::Broker::new("memory://").unwrap();
    broker.subscriber("orders").handle(|_body: String| async move {
        let counter = std::rc::Rc::new(1);
        tokio::task::yield_now().await;
        let _ = counter;
    });
}
