// A number is not a payload: return `String`, `Bytes`, `Json<T>`...
fn main() {
    let broker = ferrostream::Broker::new("memory://").unwrap();
    broker.subscriber("orders").handle(|_body: String| async move { 42u32 });
}
