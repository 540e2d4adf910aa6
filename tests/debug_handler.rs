//! `#[ferrostream::debug_handler]` (feature `macros`) names the argument or return type that is wrong
//! in a handler's signature, at that argument or type (the expected compiler output is in
//! `tests/ui_macros/*.stderr`; refresh it with `TRYBUILD=overwrite cargo test --features macros --test
//! debug_handler` after reading the diff), and leaves a correct handler as it is. Like
//! `handler_diagnostics`, it runs without broker features: trybuild compiles the crate again.
#![cfg(all(feature = "macros", not(any(feature = "kafka", feature = "amqp"))))]

#[test]
fn debug_handler_names_the_wrong_piece() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui_macros/*.rs");
    t.pass("tests/ui_macros/pass/*.rs");
}
