//! SPEC section 2: explicit settles, first settle wins, interrupts from any depth under every policy,
//! delayed nacks. Runs on every broker: messages are told apart by payload, and what stays unsettled is
//! read from the broker; the assertions about order within a partition are a log's and run only there.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrostream::{AckMessage, AckPolicy, Message, NackMessage, RejectMessage, Settle, SettleOutcome, SettledBy};

/// Subscribes `handler` as "sub" on a fresh one-partition topic and starts the app.
async fn setup<H, A>(policy: AckPolicy, handler: H) -> (ferrostream::Broker, String, String, ferrostream::RunningApp)
where
    H: ferrostream::Handler<A>,
    A: 'static,
{
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "settle", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "sub", &group)
        .ack_policy(policy)
        .handle(handler);
    let app = common::start(&broker).await;
    (broker, topic, group, app)
}

fn settles_of(observer: &ferrostream::Observer, payload: &str) -> Vec<(Settle, SettledBy)> {
    common::settles_of_payload(observer, "sub", payload)
}

/// Nothing is left unsettled once the app stopped.
async fn all_settled(broker: &ferrostream::Broker, group: &str, topic: &str) {
    assert_eq!(common::unsettled(broker, group, topic, |n| n == 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_settle_wins_and_later_settles_report_already_settled() {
    let outcomes: Arc<Mutex<Vec<SettleOutcome>>> = Arc::default();
    let seen = outcomes.clone();
    let (broker, topic, group, app) = setup(AckPolicy::NackOnError, move |msg: Message| {
        let seen = seen.clone();
        async move {
            let a = msg.ack().await;
            let b = msg.nack().await;
            let c = msg.reject().await;
            seen.lock().unwrap().extend([a, b, c]);
            // Settle then error: the policy's nack after the handler does nothing either.
            Err::<(), _>(std::io::Error::other("fails after acking"))
        }
    })
    .await;
    let observer = broker.observer();
    broker.publish("x", &topic).await.unwrap();
    broker.publish("y", &topic).await.unwrap();
    observer.wait_settled("sub", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(
        &outcomes[..3],
        &[
            SettleOutcome::Settled(Settle::Ack),
            SettleOutcome::AlreadySettled(Settle::Ack),
            SettleOutcome::AlreadySettled(Settle::Ack)
        ]
    );
    assert_eq!(settles_of(&observer, "x"), vec![(Settle::Ack, SettledBy::User)]);
    assert_eq!(
        observer.handled("sub").len(),
        2,
        "an acked message is not redelivered despite the error"
    );
    all_settled(&broker, &group, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_nack_redelivers_and_manual_ack_commits() {
    let (broker, topic, group, app) = setup(AckPolicy::Manual, |msg: Message| async move {
        // First delivery: nack. Redelivery: ack. The observer tells which is which by counting.
        let _ = if msg.payload().as_ref() == b"retry-me" && FIRST.swap(false, std::sync::atomic::Ordering::SeqCst) {
            msg.nack().await
        } else {
            msg.ack().await
        };
    })
    .await;
    static FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    let observer = broker.observer();
    broker.publish("retry-me", &topic).await.unwrap();
    broker.publish("after", &topic).await.unwrap();
    observer.wait_settled("sub", 3, common::WAIT).await.unwrap();
    if common::is_log() {
        observer
            .wait_committed(
                "sub",
                &ferrostream::TopicPartition::new(topic.as_str(), 0),
                2,
                common::WAIT,
            )
            .await
            .unwrap();
    }
    app.shutdown().await.unwrap();
    assert_eq!(
        settles_of(&observer, "retry-me"),
        vec![(Settle::NACK, SettledBy::User), (Settle::Ack, SettledBy::User)]
    );
    let mut order: Vec<String> = observer.handled("sub").into_iter().map(|h| h.2).collect();
    if common::is_log() {
        assert_eq!(
            order,
            ["retry-me", "retry-me", "after"],
            "the nacked offset comes back before the next one"
        );
    } else {
        order.sort();
        assert_eq!(
            order,
            ["after", "retry-me", "retry-me"],
            "the nacked message comes back"
        );
    }
    all_settled(&broker, &group, &topic).await;
}

/// Subscribes `handler` as "sub" on a fresh one-partition topic that already holds `bodies`, starts the
/// app, waits for `settles` settles and returns the offsets in the order the handler got them.
async fn handled_order_over_a_backlog<H, A>(
    policy: AckPolicy,
    bodies: &[&'static str],
    settles: usize,
    handler: H,
) -> Vec<i64>
where
    H: ferrostream::Handler<A>,
    A: 'static,
{
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "settle", 1).await;
    for body in bodies {
        broker.publish(*body, &topic).await.unwrap();
    }
    common::member(&broker, &topic, "sub", &common::unique("g"))
        .ack_policy(policy)
        .handle(handler);
    let observer = broker.observer();
    let app = common::start(&broker).await;
    observer.wait_settled("sub", settles, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    observer.handled("sub").iter().map(|h| h.1).collect()
}

/// A nack made by handler code reaches the engine through a channel, while the handler's return frees its
/// slot at once: the nack must be applied first, or the next message of the lane starts before the nacked
/// one is back in the queue. The backlog is there before the app starts, so the next message is always
/// ready when the nack is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_from_handler_code_requeues_before_the_next_message_starts() {
    if !common::is_log() {
        return; // order within a partition is a log's; a queue puts a nacked message back
    }
    for policy in [AckPolicy::Manual, AckPolicy::NackOnError] {
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let order = handled_order_over_a_backlog(policy, &["nack-me", "b", "c"], 4, move |msg: Message| {
            let first = first.clone();
            async move {
                let outcome = if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    msg.nack().await
                } else {
                    msg.ack().await
                };
                assert!(outcome.took_effect());
            }
        })
        .await;
        assert_eq!(
            order,
            vec![0, 0, 1, 2],
            "{policy:?}: the nacked offset comes back before the next one"
        );
    }
}

/// The same through a handle kept from an earlier call: under `Manual` a call may end with its message
/// unsettled, and a later call may nack it while its own message is settled by the policy (here by an
/// `AckMessage` interrupt). That nack, too, is back in the queue before the next message starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_through_a_kept_handle_requeues_before_the_next_message_starts() {
    if !common::is_log() {
        return; // order within a partition is a log's; a queue puts a nacked message back
    }
    let kept: Arc<Mutex<Option<Message>>> = Arc::default();
    let bodies = ["kept", "nacks-the-kept-one", "c", "d"];
    let order = handled_order_over_a_backlog(AckPolicy::Manual, &bodies, 5, move |msg: Message| {
        let kept = kept.clone();
        async move {
            match (msg.offset(), msg.attempt()) {
                (0, 1) => *kept.lock().unwrap() = Some(msg), // left unsettled for the next call
                (1, _) => {
                    let earlier = kept.lock().unwrap().take().expect("offset 0 came first");
                    assert!(earlier.nack().await.took_effect());
                    Err(AckMessage)?
                }
                _ => assert!(msg.ack().await.took_effect()),
            }
            Ok::<(), ferrostream::Error>(())
        }
    })
    .await;
    assert_eq!(
        order,
        vec![0, 1, 0, 2, 3],
        "the nacked offset comes back before the next one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_reject_settles_without_redelivery() {
    let (broker, topic, group, app) = setup(AckPolicy::Manual, |msg: Message| async move {
        if msg.payload().as_ref() == b"bad" {
            assert!(msg.reject().await.took_effect());
        } else {
            let _ = msg.ack().await;
        }
    })
    .await;
    let observer = broker.observer();
    broker.publish("bad", &topic).await.unwrap();
    broker.publish("good", &topic).await.unwrap();
    observer.wait_settled("sub", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(settles_of(&observer, "bad"), vec![(Settle::Reject, SettledBy::User)]);
    assert_eq!(observer.handled("sub").len(), 2);
    all_settled(&broker, &group, &topic).await;
}

/// Deep in the call stack, as in the seed's `smth_processing`.
fn smth_processing(body: &str) -> Result<(), ferrostream::Error> {
    match body {
        "ack" => Err(AckMessage)?,
        "nack" => Err(NackMessage::default())?,
        "reject" => Err(RejectMessage)?,
        _ => Ok(()),
    }
}

fn nested(body: &str) -> Result<(), ferrostream::Error> {
    smth_processing(body)?;
    Ok(())
}

/// Runs the three interrupts under `policy`: each message is interrupted on its first delivery and acked
/// explicitly otherwise. Returns the settles of each message ("ack", "nack", "reject") and how often each
/// was handled, once nothing is left unsettled.
async fn interrupts_under(policy: AckPolicy) -> (Vec<Vec<(Settle, SettledBy)>>, Vec<usize>) {
    let attempts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let seen = attempts.clone();
    let (broker, topic, group, app) = setup(policy, move |body: String, msg: Message| {
        let seen = seen.clone();
        async move {
            let n = {
                let mut m = seen.lock().unwrap();
                let n = m.entry(body.clone()).or_default();
                *n += 1;
                *n
            };
            if n == 1 {
                nested(&body)?; // interrupts every message but the last
            }
            let _ = msg.ack().await;
            Ok::<_, ferrostream::Error>(())
        }
    })
    .await;
    let observer = broker.observer();
    for body in ["ack", "nack", "reject", "last"] {
        broker.publish(body, &topic).await.unwrap();
    }
    // The nacked message comes back before "last" on a log, after it on a queue.
    let nack_calls = if policy == AckPolicy::AckFirst { 1 } else { 2 };
    observer
        .wait_until("every message handled", common::WAIT, |_| {
            let handled = observer.handled("sub");
            let count = |body: &str| handled.iter().filter(|h| h.2 == body).count();
            (count("last") == 1 && count("nack") == nack_calls).then_some(())
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let bodies = ["ack", "nack", "reject"];
    let settles = bodies.iter().map(|b| settles_of(&observer, b)).collect();
    let calls = {
        let counts = attempts.lock().unwrap();
        bodies.iter().map(|b| counts.get(*b).copied().unwrap_or(0)).collect()
    };
    all_settled(&broker, &group, &topic).await;
    (settles, calls)
}

async fn check_interrupts(policy: AckPolicy) {
    use SettledBy::*;
    let (settles, calls) = interrupts_under(policy).await;
    if policy == AckPolicy::AckFirst {
        // Already acked on receipt: interrupts change nothing and nothing is redelivered.
        for s in &settles {
            assert_eq!(s, &vec![(Settle::Ack, Receipt)]);
        }
        assert_eq!(calls, vec![1, 1, 1]);
    } else {
        assert_eq!(settles[0], vec![(Settle::Ack, Interrupt)], "AckMessage acks at once");
        assert_eq!(
            settles[1],
            vec![(Settle::NACK, Interrupt), (Settle::Ack, User)],
            "NackMessage redelivers"
        );
        assert_eq!(
            settles[2],
            vec![(Settle::Reject, Interrupt)],
            "RejectMessage rejects at once"
        );
        assert_eq!(calls, vec![1, 2, 1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_from_nested_functions_under_ack_first() {
    check_interrupts(AckPolicy::AckFirst).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_from_nested_functions_under_ack() {
    check_interrupts(AckPolicy::Ack).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_from_nested_functions_under_reject_on_error() {
    check_interrupts(AckPolicy::RejectOnError).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_from_nested_functions_under_nack_on_error() {
    check_interrupts(AckPolicy::NackOnError).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_from_nested_functions_under_manual() {
    check_interrupts(AckPolicy::Manual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_after_redelivers_no_earlier_than_the_delay() {
    const DELAY: Duration = Duration::from_millis(400);
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = times.clone();
    let (broker, topic, _group, app) = setup(AckPolicy::Manual, move |msg: Message| {
        let seen = seen.clone();
        async move {
            let first = {
                let mut t = seen.lock().unwrap();
                t.push(Instant::now());
                t.len() == 1
            };
            if first {
                let _ = msg.nack_after(DELAY).await;
            } else {
                let _ = msg.ack().await;
            }
        }
    })
    .await;
    let observer = broker.observer();
    broker.publish("later", &topic).await.unwrap();
    observer.wait_settled("sub", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let t = times.lock().unwrap();
    assert_eq!(t.len(), 2);
    let gap = t[1] - t[0];
    assert!(gap >= DELAY, "redelivered after {gap:?}, before the {DELAY:?} delay");
}

/// Guarantee 2.7: without a retry policy, a message that keeps failing comes back after 10 ms, then 20,
/// 40... (doubling up to 5 s), never in a hot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_message_backs_off_exponentially_without_a_retry_policy() {
    const FLOOR: Duration = Duration::from_millis(10);
    const CALLS: usize = 7;
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = times.clone();
    let (broker, topic, _group, app) = setup(AckPolicy::NackOnError, move |_: String| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(Instant::now());
            Err::<(), _>(std::io::Error::other("always fails"))
        }
    })
    .await;
    let observer = broker.observer();
    broker.publish("poison", &topic).await.unwrap();
    observer.wait_handled("sub", CALLS, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let t = times.lock().unwrap().clone();
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).take(CALLS - 1).collect();
    println!("gaps between attempts: {gaps:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let floor = FLOOR * (1 << i);
        assert!(
            *gap >= floor,
            "attempt {} came {gap:?} after the previous one, before {floor:?}",
            i + 2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinates_name_the_brokers_own_position() {
    let got: Arc<Mutex<Vec<Message>>> = Arc::default();
    let g = got.clone();
    let (broker, topic, _group, app) = setup(AckPolicy::Ack, move |msg: Message| {
        let g = g.clone();
        async move { g.lock().unwrap().push(msg) }
    })
    .await;
    let observer = broker.observer();
    broker.publish("first", &topic).await.unwrap();
    observer.wait_settled("sub", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let msg = got.lock().unwrap()[0].clone();
    let expected = if common::is_log() {
        ferrostream::Coordinates::Log {
            topic: &topic,
            partition: 0,
            offset: 0,
        }
    } else {
        // A channel numbers its deliveries from 1.
        ferrostream::Coordinates::Queue {
            queue: &topic,
            delivery_tag: 1,
        }
    };
    assert_eq!(msg.coordinates(), expected);
}
