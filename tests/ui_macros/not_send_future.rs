// An `Rc` held across an `.await` makes the future `!Send`.
#[ferrostream::debug_handler]
async fn on_text(body: String) {
    let counter = std::rc::Rc::new(body);
    tokio::task::yield_now().await;
    let _ = counter;
}

fn main() {}
