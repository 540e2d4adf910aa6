// A number is not a payload: return `String`, `Bytes`, `Json<T>`...
#[ferrostream::debug_handler]
async fn count(body: String) -> Result<usize, ferrostream::Error> {
    Ok(body.len())
}

fn main() {}
