//! Handler signature mistakes fail to compile with an error that says what a handler may take and
//! return, not only an opaque "trait bound not satisfied" (the expected compiler output is in
//! `tests/ui/*.stderr`; refresh it with `TRYBUILD=overwrite cargo test --test handler_diagnostics` after
//! reading the diff). It runs in the build without broker features (the test command's memory stage):
//! trybuild compiles the crate again in a target of its own, and that need not include librdkafka.
#![cfg(not(any(feature = "kafka", feature = "amqp")))]

#[test]
fn handler_mistakes_name_what_is_allowed() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
