// `Handler` is implemented for functions of up to 8 arguments.
use ferrostream::{Attempt, Headers, Key, Message, debug_handler};

#[debug_handler]
async fn on_text(a: String, b: Message, c: Headers, d: Key, e: Attempt, f: Message, g: Headers, h: Key, i: Attempt) {
    let _ = (a, b, c, d, e, f, g, h, i);
}

fn main() {}
