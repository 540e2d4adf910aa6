// A generic handler cannot be checked: its types are not known at its definition.
#[ferrostream::debug_handler]
async fn on_json<T: serde::de::DeserializeOwned + Send + 'static>(body: ferrostream::Json<T>) {
    let _ = body;
}

fn main() {}
