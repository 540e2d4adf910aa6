// A handler is an `async fn`.
#[ferrostream::debug_handler]
fn on_text(body: String) {
    let _ = body;
}

fn main() {}
