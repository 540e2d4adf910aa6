// `&str` cannot outlive the message: handlers take owned values.
#[ferrostream::debug_handler]
async fn on_text(body: &str) {
    let _ = body;
}

fn main() {}
