//! SPEC section 1: every row of the ack-policy table, for handler success, error, panic and decode failure.
//!
//! Each case publishes m1 (the case under test: it misbehaves on its first attempt only, or never decodes)
//! and then m2 (always fine) to a one-partition topic (a queue on RabbitMQ), waits until m2 has been
//! handled, and checks how m1 was settled, how often it was handled, and what was left unsettled after a
//! graceful shutdown (uncommitted offsets on a log, messages back in the queue on RabbitMQ). Messages are
//! told apart by payload, so the suite runs unchanged on every broker.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrostream::observe::Outcome;
use ferrostream::{AckPolicy, Json, Settle, SettledBy, State};
use serde::Deserialize;

#[derive(Deserialize, schemars::JsonSchema)]
struct Item {
    id: u32,
    fail: String,
}

#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<u32, usize>>>);

impl Attempts {
    fn bump(&self, id: u32) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(id).or_default();
        *n += 1;
        *n
    }
}

async fn handler(Json(item): Json<Item>, State(attempts): State<Attempts>) -> Result<(), ferrostream::Error> {
    if attempts.bump(item.id) == 1 {
        match item.fail.as_str() {
            "error" => return Err(ferrostream::Error::handler(std::io::Error::other("boom"))),
            "panic" => panic!("handler exploded on item {}", item.id),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Success,
    Error,
    Panic,
    /// m1 never decodes (rejected by default).
    Decode,
    /// m1 never decodes, and the subscriber treats decode errors as handler errors.
    DecodeAsError,
}

struct CaseResult {
    /// Settles of m1, in order.
    settles: Vec<(Settle, SettledBy)>,
    /// Outcomes of m1's handler calls, in order.
    calls: Vec<Outcome>,
    /// Handler calls of m2.
    m2_calls: usize,
    /// Messages left unsettled after shutdown.
    unsettled: u64,
    metrics: ferrostream::SubscriberMetrics,
}

const M2: &str = r#"{"id":2,"fail":"none"}"#;

/// How many messages the case leaves unsettled: both under `Manual` (the framework settles nothing) and
/// when m1 never decodes under `NackOnError` (on a log m2 waits behind it uncommitted; on a queue m2 is
/// acked and m1 is back in the queue, at least once), none otherwise.
fn expected_unsettled(policy: AckPolicy, behaviour: Behaviour) -> impl Fn(u64) -> bool {
    move |n| match (policy, behaviour) {
        // Guarantee 2.4: the framework rejects m1, which user code never saw; m2 is the handler's to settle.
        (AckPolicy::Manual, Behaviour::Decode) => n == 1,
        (AckPolicy::Manual, _) => n == 2,
        (AckPolicy::NackOnError, Behaviour::DecodeAsError) if common::is_log() => n == 2,
        (AckPolicy::NackOnError, Behaviour::DecodeAsError) => n >= 1,
        _ => n == 0,
    }
}

async fn run_case(policy: AckPolicy, behaviour: Behaviour) -> CaseResult {
    common::init_tracing();
    let broker = common::broker().with_state(Attempts::default());
    let topic = common::topic(&broker, "policy", 1).await;
    let group = common::unique("g");
    let observer = broker.observer();
    let on_decode_error = match behaviour {
        Behaviour::DecodeAsError => ferrostream::OnDecodeError::AsHandlerError,
        _ => ferrostream::OnDecodeError::Reject,
    };
    common::member(&broker, &topic, "sub", &group)
        .ack_policy(policy)
        .on_decode_error(on_decode_error)
        .handle(handler);
    let app = common::start(&broker).await;
    let m1 = match behaviour {
        Behaviour::Success => r#"{"id":1,"fail":"none"}"#,
        Behaviour::Error => r#"{"id":1,"fail":"error"}"#,
        Behaviour::Panic => r#"{"id":1,"fail":"panic"}"#,
        Behaviour::Decode | Behaviour::DecodeAsError => "this is not json",
    };
    broker.publish(m1, &topic).await.unwrap();
    broker.publish(M2, &topic).await.unwrap();

    if policy == AckPolicy::NackOnError && behaviour == Behaviour::DecodeAsError {
        // It can never decode and is handled as a handler error: nacked and redelivered, it blocks the
        // partition. Watch three attempts, then stop.
        observer
            .wait_until("three attempts at m1", common::WAIT, |_| {
                let m2_done = common::is_log() || !observer_calls(&observer, M2).is_empty();
                (observer_calls(&observer, m1).len() >= 3 && m2_done).then_some(())
            })
            .await
            .unwrap();
    } else {
        // m1 fails once under NackOnError and comes back: before m2 on a log, after it on a queue.
        let m1_calls = match (policy, behaviour) {
            (AckPolicy::NackOnError, Behaviour::Error | Behaviour::Panic) => 2,
            _ => 1,
        };
        observer
            .wait_until("m1 and m2 handled", common::WAIT, |_| {
                (!observer_calls(&observer, M2).is_empty() && observer_calls(&observer, m1).len() >= m1_calls)
                    .then_some(())
            })
            .await
            .unwrap();
    }
    app.shutdown().await.unwrap();
    let unsettled = common::unsettled(&broker, &group, &topic, expected_unsettled(policy, behaviour)).await;
    CaseResult {
        settles: common::settles_of_payload(&observer, "sub", m1),
        calls: observer_calls(&observer, m1),
        m2_calls: observer_calls(&observer, M2).len(),
        unsettled,
        metrics: broker.metrics().get("sub"),
    }
}

fn observer_calls(observer: &ferrostream::Observer, payload: &str) -> Vec<Outcome> {
    observer
        .handled("sub")
        .into_iter()
        .filter(|(_, _, p, _)| p == payload)
        .map(|(_, _, _, out)| out)
        .collect()
}

fn check(policy: AckPolicy, behaviour: Behaviour, r: &CaseResult) {
    use Behaviour::*;
    use SettledBy::*;
    let failed = behaviour != Success;
    // The first call's outcome is typed by what went wrong.
    let first = &r.calls[0];
    match behaviour {
        Success => assert_eq!(first, &Outcome::Ok),
        Error => assert!(
            matches!(
                first,
                Outcome::Failed {
                    kind: ferrostream::FailureKind::Handler,
                    ..
                }
            ),
            "{first:?}"
        ),
        Panic => assert!(
            matches!(first, Outcome::Failed { kind: ferrostream::FailureKind::Panic, message } if message.contains("exploded")),
            "{first:?}"
        ),
        Decode | DecodeAsError => assert!(
            matches!(first, Outcome::Failed { kind: ferrostream::FailureKind::Decode, message }
                if message.contains("sub") && message.contains("Item") && message.contains("expected")),
            "decode errors name subscriber, target type and cause: {first:?}"
        ),
    }
    // Every failure is counted (SPEC 2.5).
    let counted = match behaviour {
        Success => r.metrics.handler_errors + r.metrics.panics + r.metrics.decode_errors == 0,
        Error => r.metrics.handler_errors >= 1,
        Panic => r.metrics.panics >= 1,
        Decode | DecodeAsError => r.metrics.decode_errors >= 1,
    };
    assert!(counted, "{behaviour:?} counted in {:?}", r.metrics);

    match (policy, behaviour) {
        (AckPolicy::AckFirst, _) => {
            assert_eq!(r.settles, vec![(Settle::Ack, Receipt)]);
            assert_eq!(r.calls.len(), 1, "at most once: never handled again");
        }
        // Guarantee 2.4: under every other policy a message that cannot decode is rejected, once.
        (_, Decode) => {
            assert_eq!(r.settles, vec![(Settle::Reject, Policy)]);
            assert_eq!(r.calls.len(), 1, "an undecodable message is never delivered again");
            assert_eq!(r.m2_calls, 1, "nothing waits behind it");
        }
        (AckPolicy::Ack, _) => {
            assert_eq!(r.settles, vec![(Settle::Ack, Policy)]);
            assert_eq!(r.calls.len(), 1);
        }
        (AckPolicy::RejectOnError, _) => {
            let expected = if failed { Settle::Reject } else { Settle::Ack };
            assert_eq!(r.settles, vec![(expected, Policy)]);
            assert_eq!(r.calls.len(), 1, "a rejected message is never delivered again");
        }
        (AckPolicy::NackOnError, _) => match behaviour {
            Success => assert_eq!(r.settles, vec![(Settle::Ack, Policy)]),
            Error | Panic => {
                assert_eq!(r.settles, vec![(Settle::NACK, Policy), (Settle::Ack, Policy)]);
                assert_eq!(r.calls.len(), 2, "redelivered once, then succeeded");
                assert_eq!(r.calls[1], Outcome::Ok);
            }
            Decode | DecodeAsError => {
                assert!(
                    r.settles.len() >= 3 && r.settles.iter().all(|s| *s == (Settle::NACK, Policy)),
                    "{:?}",
                    r.settles
                );
                if common::is_log() {
                    assert_eq!(r.m2_calls, 0, "m2 waits behind the nacked m1 (per-partition order)");
                } else {
                    assert_eq!(r.m2_calls, 1, "on a queue the nacked m1 holds nothing back");
                }
            }
        },
        (AckPolicy::Manual, _) => {
            assert!(
                r.settles.is_empty(),
                "Manual: the framework settles nothing: {:?}",
                r.settles
            );
            assert_eq!(r.calls.len(), 1);
        }
    }
    // Settled messages are gone for good; unsettled ones stay (a log: uncommitted, m2 included behind an
    // unsettled m1; a queue: back in it).
    assert!(
        expected_unsettled(policy, behaviour)(r.unsettled),
        "{policy:?}/{behaviour:?}: {} left unsettled",
        r.unsettled
    );
}

macro_rules! case {
    ($name:ident, $policy:ident, $behaviour:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let r = run_case(AckPolicy::$policy, Behaviour::$behaviour).await;
            check(AckPolicy::$policy, Behaviour::$behaviour, &r);
        }
    };
}

case!(ack_first_success, AckFirst, Success);
case!(ack_first_error, AckFirst, Error);
case!(ack_first_panic, AckFirst, Panic);
case!(ack_first_decode_failure, AckFirst, Decode);
case!(ack_success, Ack, Success);
case!(ack_error, Ack, Error);
case!(ack_panic, Ack, Panic);
case!(ack_decode_failure, Ack, Decode);
case!(reject_on_error_success, RejectOnError, Success);
case!(reject_on_error_error, RejectOnError, Error);
case!(reject_on_error_panic, RejectOnError, Panic);
case!(reject_on_error_decode_failure, RejectOnError, Decode);
case!(nack_on_error_success, NackOnError, Success);
case!(nack_on_error_error, NackOnError, Error);
case!(nack_on_error_panic, NackOnError, Panic);
case!(nack_on_error_decode_failure, NackOnError, Decode);
case!(manual_success, Manual, Success);
case!(manual_error, Manual, Error);
case!(manual_panic, Manual, Panic);
case!(manual_decode_failure, Manual, Decode);
case!(
    nack_on_error_decode_failure_as_handler_error,
    NackOnError,
    DecodeAsError
);
