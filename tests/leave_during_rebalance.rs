//! SPEC 3.7 at shutdown: a member that is draining for its shutdown when a rebalance revokes its partitions
//! (another member joins meanwhile) hands them over with its final commit: nothing is lost, nothing is
//! handled twice, and nothing is logged at WARN or above. Before, on Kafka, the revocation's reply was
//! dropped with the stopping engine, and the member logged "engine did not drain revoked partitions in
//! time" though it had drained and committed; then the assignment of the next generation, which reached
//! the stopping member, hung its close for 15 s (positions looked up from a group that no longer answers,
//! then librdkafka's unassign inside the close). Runs on every log broker; in its own binary, since it installs a
//! process-wide tracing subscriber that records ferrostream's events.

mod common;

#[path = "common/logs.rs"]
mod logs;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use ferrostream::{AckPolicy, Message, State};
use tokio::sync::{Notify, mpsc};

/// The recorded events of these subscribers at `level` or above, as (level, subscriber, message).
fn events_of(names: &[&str], level: tracing::Level) -> Vec<(tracing::Level, String, String)> {
    logs::at_least(level)
        .into_iter()
        .filter(|e| names.contains(&e.subscriber.as_str()))
        .map(|e| (e.level.unwrap_or(level), e.subscriber, e.message))
        .collect()
}

/// What the members' handlers shared: every call as (member, partition, offset), the signal that the slow
/// message is being handled, and the gate that lets it finish.
#[derive(Clone)]
struct Shared {
    calls: Arc<Mutex<Vec<(String, i32, i64)>>>,
    slow_started: mpsc::UnboundedSender<()>,
    gate: Arc<Notify>,
}

async fn handle(msg: Message, State(shared): State<Shared>, member: &'static str) {
    shared
        .calls
        .lock()
        .unwrap()
        .push((member.to_owned(), msg.partition(), msg.offset()));
    if &msg.payload()[..] == b"slow" {
        let _ = shared.slow_started.send(());
        shared.gate.notified().await;
    }
}

async fn leave_while_a_join_revokes(policy: AckPolicy) {
    logs::install();
    const MESSAGES: i64 = 200;
    let (slow_started, mut slow_seen) = mpsc::unbounded_channel();
    let shared = Shared {
        calls: Arc::default(),
        slow_started,
        gate: Arc::new(Notify::new()),
    };
    let broker = common::broker().with_state(shared.clone());
    let topic = common::topic(&broker, "leave-revoke", 2).await;
    let group = common::unique("g");
    let a = common::unique("a");
    let b = common::unique("b");
    // Partition 0 starts with the slow message; the rest follow on both partitions.
    let mut published = BTreeSet::new();
    for i in 0..MESSAGES {
        let payload = if i == 0 { "slow".to_owned() } else { format!("m{i}") };
        let ack = broker
            .publish(payload, &topic)
            .partition((i % 2) as i32)
            .await
            .expect("publish");
        published.insert((ack.partition, ack.offset));
    }
    let name_a: &'static str = Box::leak(a.clone().into_boxed_str());
    let name_b: &'static str = Box::leak(b.clone().into_boxed_str());
    common::member(&broker, &topic, name_a, &group)
        .ack_policy(policy)
        .handle(move |m: Message, s: State<Shared>| handle(m, s, name_a));
    let app_a = common::start(&broker).await;
    tokio::time::timeout(common::WAIT, slow_seen.recv())
        .await
        .expect("member a handles the slow message")
        .unwrap();

    // a starts its shutdown with the slow message in flight, so it drains; b joins meanwhile.
    let stopping_a = tokio::spawn(app_a.shutdown());
    common::member(&broker, &topic, name_b, &group)
        .ack_policy(policy)
        .handle(move |m: Message, s: State<Shared>| handle(m, s, name_b));
    // b's start returns once b has partitions, which is after a has left: both run side by side here
    // (a start is not `Send`, so not spawned).
    let hand_over = async {
        // The rebalance that b's join starts reaches a while a drains.
        let revoking = logs::wait_for(common::WAIT, |events| {
            events
                .iter()
                .any(|e| e.subscriber == name_a && e.message.starts_with("partitions revoked; waiting"))
        });
        assert!(revoking.await, "b's join revokes a's partitions while a drains");
        // What comes now is for b: a takes nothing new while it stops.
        for i in 0..MESSAGES {
            let ack = broker
                .publish(format!("late{i}"), &topic)
                .partition((i % 2) as i32)
                .await
                .expect("publish");
            published.insert((ack.partition, ack.offset));
        }
        shared.gate.notify_one();
        stopping_a.await.unwrap().expect("a shuts down");
    };
    let (app_b, ()) = tokio::join!(common::start(&broker), hand_over);
    broker
        .observer()
        .wait_until("every message handled", common::WAIT, |_| {
            let calls = shared.calls.lock().unwrap();
            let handled: BTreeSet<(i32, i64)> = calls.iter().map(|(_, p, o)| (*p, *o)).collect();
            (handled == published).then_some(())
        })
        .await
        .unwrap_or_else(|e| {
            let calls = shared.calls.lock().unwrap();
            let handled: BTreeSet<(i32, i64)> = calls.iter().map(|(_, p, o)| (*p, *o)).collect();
            let missing: Vec<_> = published.difference(&handled).collect();
            let logged = events_of(&[name_a, name_b], tracing::Level::DEBUG);
            panic!("{e}: never handled {missing:?}; the members logged {logged:?}")
        });
    app_b.shutdown().await.expect("b shuts down");

    let calls = shared.calls.lock().unwrap().clone();
    let by_a = calls.iter().filter(|(m, ..)| m == name_a).count();
    println!("{policy:?}: a handled {by_a}, b handled {}", calls.len() - by_a);
    assert!(
        by_a >= 1 && by_a < calls.len(),
        "both members handled messages: {by_a} of {}",
        calls.len()
    );
    assert_eq!(calls.len(), published.len(), "no message handled twice: {calls:?}");
    let loud = events_of(&[name_a, name_b], tracing::Level::WARN);
    assert!(
        loud.is_empty(),
        "a graceful leave during a rebalance logs nothing at WARN or above: {loud:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopping_while_a_join_revokes_its_partitions_hands_them_over_committed() {
    leave_while_a_join_revokes(AckPolicy::NackOnError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_under_ack_first() {
    leave_while_a_join_revokes(AckPolicy::AckFirst).await;
}
