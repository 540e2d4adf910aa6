//! SPEC 3.7 and 3.1 under churn: members join and leave a group while it consumes, and still nothing is
//! lost, no commit ever passes an offset that was not settled, and the group ends up committing everything.
//! Also: Kafka's cooperative-sticky assignor (a client setting passed through the URL) works.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::observe::Outcome;
use ferrostream::{Broker, Event, Message, Observer, RunningApp, State, TopicPartition};
use futures::StreamExt;

/// (partition, offset) of a handled or published message.
type Coord = (i32, i64);

/// Every successful handler call of any member, as (partition, offset), with repeats.
fn handled_ok(events: &[Event]) -> Vec<Coord> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Handled {
                tp,
                offset,
                outcome: Outcome::Ok,
                ..
            } => Some((tp.partition, *offset)),
            _ => None,
        })
        .collect()
}

/// Replays the ordered event log: every `Committed { tp, offset }` event, by any member, must come after a
/// completing settle (ack or reject), by any member, of every offset of `tp` below `offset`. Returns the
/// violations.
fn commits_past_unsettled_offsets(events: &[Event]) -> Vec<String> {
    let mut settled: HashMap<&TopicPartition, BTreeSet<i64>> = HashMap::new();
    // Per partition: every offset below this one has been settled (the set only grows).
    let mut prefix: HashMap<&TopicPartition, i64> = HashMap::new();
    let mut violations = Vec::new();
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Settled { tp, offset, settle, .. } if settle.completes() => {
                settled.entry(tp).or_default().insert(*offset);
            }
            Event::Committed { subscriber, tp, offset } => {
                let done = settled.entry(tp).or_default();
                let p = prefix.entry(tp).or_insert(0);
                while done.contains(p) {
                    *p += 1;
                }
                if *p < *offset {
                    violations.push(format!(
                        "event #{i}: `{subscriber}` committed {tp} up to {offset} while offset {p} was not settled yet"
                    ));
                }
            }
            _ => {}
        }
    }
    violations
}

/// What the handlers saw, shared by every member.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Coord>>>);

async fn record_and_work(msg: Message, State(seen): State<Seen>) {
    seen.0.lock().unwrap().push((msg.partition(), msg.offset()));
    // A little work, so that members join and leave while messages are in flight.
    tokio::time::sleep(Duration::from_millis(2 + (msg.offset() % 3) as u64)).await;
}

fn subscribe(broker: &Broker, topic: &str, group: &str, name: &str) {
    common::member(broker, topic, name, group)
        .auto_commit(false) // NackOnError
        .handle(record_and_work);
}

/// Waits until the group as a whole has made at least `n` successful handler calls; returns how many.
async fn wait_progress(observer: &Observer, n: usize) -> usize {
    observer
        .wait_until(
            &format!("{n} successful handler calls"),
            Duration::from_secs(60),
            |ev| {
                let done = handled_ok(ev).len();
                (done >= n).then_some(done)
            },
        )
        .await
        .unwrap()
}

async fn shut(app: RunningApp, name: &str) {
    app.shutdown()
        .await
        .unwrap_or_else(|e| panic!("`{name}` shuts down: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_and_leaving_mid_stream_lose_nothing() {
    const MESSAGES: usize = 3000;
    common::init_tracing();
    let seen = Seen::default();
    let broker = common::broker().with_state(seen.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "rebalance-churn", 4).await;
    let group = common::unique("g");

    subscribe(&broker, &topic, &group, "member-a");
    let app_a = common::start(&broker).await;

    let publisher = {
        let (broker, topic) = (broker.clone(), topic.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..MESSAGES)
                .map(|i| {
                    broker
                        .publish(format!("m{i}"), &topic)
                        .key(format!("key-{}", i % 50))
                        .into_future()
                })
                .buffer_unordered(32)
                .map(|r| {
                    let ack = r.expect("publish");
                    (ack.partition, ack.offset)
                })
                .collect::<BTreeSet<Coord>>()
                .await
        })
    };

    // Each membership change waits for some progress, so that it happens while the group consumes.
    let mut steps = Vec::new();
    steps.push(("b joins", wait_progress(&observer, MESSAGES / 10).await));
    subscribe(&broker, &topic, &group, "member-b");
    let app_b = common::start(&broker).await;
    steps.push(("c joins", wait_progress(&observer, MESSAGES * 3 / 10).await));
    subscribe(&broker, &topic, &group, "member-c");
    let app_c = common::start(&broker).await;
    steps.push(("b leaves", wait_progress(&observer, MESSAGES / 2).await));
    shut(app_b, "member-b").await;
    steps.push(("c leaves", wait_progress(&observer, MESSAGES * 7 / 10).await));
    shut(app_c, "member-c").await;
    println!("successful handler calls when each change began: {steps:?}");

    let published = publisher.await.expect("publisher task");
    assert_eq!(published.len(), MESSAGES, "every publish got its own offset");
    let end = broker.end_offsets(&topic).await.unwrap();
    let expected: BTreeSet<Coord> = end.iter().flat_map(|(p, o)| (0..*o).map(move |o| (*p, o))).collect();
    assert_eq!(
        expected, published,
        "the end offsets cover exactly the published messages"
    );

    let missing = observer
        .wait_until("every message handled successfully", Duration::from_secs(120), |ev| {
            let done: BTreeSet<Coord> = handled_ok(ev).into_iter().collect();
            expected.is_subset(&done).then_some(())
        })
        .await
        .map_err(|e| {
            let done: BTreeSet<Coord> = handled_ok(&observer.events()).into_iter().collect();
            let missing: Vec<&Coord> = expected.difference(&done).take(20).collect();
            format!("{e}; first missing: {missing:?}")
        });
    // A alone owns everything now; let its regular commits catch up before shutting it down, so the final
    // check below does not rest on the shutdown commit alone.
    let a_caught_up = observer
        .wait_until("member-a committing every partition to its end", common::WAIT, |ev| {
            let committed = committed_by_anyone(ev);
            end.iter()
                .all(|(p, o)| committed.get(&TopicPartition::new(topic.as_str(), *p)) == Some(o))
                .then_some(())
        })
        .await;
    shut(app_a, "member-a").await;
    missing.unwrap();
    a_caught_up.unwrap();

    let events = observer.events();
    let handled = handled_ok(&events);
    let unique: BTreeSet<Coord> = handled.iter().copied().collect();
    assert_eq!(unique, expected, "every message handled successfully, nothing else");
    let recorded: BTreeSet<Coord> = seen.0.lock().unwrap().iter().copied().collect();
    assert_eq!(recorded, expected, "the handlers themselves saw every message");
    assert_eq!(commits_past_unsettled_offsets(&events), Vec::<String>::new());
    for name in ["member-a", "member-b", "member-c"] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Assigned { subscriber, partitions }
                if &**subscriber == name && !partitions.is_empty())),
            "`{name}` owned partitions at some point"
        );
    }

    let mut by_member: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        if let Event::Handled {
            subscriber,
            outcome: Outcome::Ok,
            ..
        } = e
        {
            *by_member.entry(subscriber).or_default() += 1;
        }
    }
    let mut commits_by_member: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        if let Event::Committed { subscriber, .. } = e {
            *commits_by_member.entry(subscriber).or_default() += 1;
        }
    }
    println!("commits checked against the settles before them, by member: {commits_by_member:?}");
    for name in ["member-a", "member-b", "member-c"] {
        assert!(
            commits_by_member.get(name).is_some_and(|n| *n > 0),
            "`{name}` committed its work: {commits_by_member:?}"
        );
    }
    let mut repeats: BTreeMap<Coord, usize> = BTreeMap::new();
    for c in &handled {
        *repeats.entry(*c).or_default() += 1;
    }
    println!(
        "{} handler calls for {} messages: {} duplicates ({} messages handled more than once); by member: {by_member:?}",
        handled.len(),
        expected.len(),
        handled.len() - unique.len(),
        repeats.values().filter(|n| **n > 1).count()
    );

    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap(),
        end,
        "the group committed every partition to its end"
    );
}

/// The highest offset committed for each partition, by any member.
fn committed_by_anyone(events: &[Event]) -> BTreeMap<TopicPartition, i64> {
    let mut out = BTreeMap::new();
    for e in events {
        if let Event::Committed { tp, offset, .. } = e {
            let c = out.entry(tp.clone()).or_insert(*offset);
            *c = (*c).max(*offset);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_sticky_assignor_is_supported() {
    common::init_tracing();
    let base = common::broker_url();
    // A client setting: on Kafka it is passed to librdkafka through the URL; the in-memory broker has no
    // assignor settings, so it runs the same test with its own (range) assignor.
    let url = if common::is_memory() {
        base
    } else {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}partition.assignment.strategy=cooperative-sticky")
    };
    let broker = Broker::new(&url).unwrap_or_else(|e| panic!("cannot use test broker {url}: {e}"));
    let observer = broker.observer();
    let topic = common::topic(&broker, "rebalance-coop", 4).await;
    let group = common::unique("g");
    let member = |name: &str| {
        common::member(&broker, &topic, name, &group)
            .auto_commit(false)
            .handle(|_: String| async {});
    };
    member("coop-a");
    let app_a = common::start(&broker).await;
    observer
        .wait_until("coop-a owning the four partitions", common::WAIT, |_| {
            (observer.assignment("coop-a").len() == 4).then_some(())
        })
        .await
        .unwrap();
    member("coop-b");
    let app_b = common::start(&broker).await;
    observer
        .wait_until("a 2/2 split of the four partitions", common::WAIT, |_| {
            (observer.assignment("coop-a").len() == 2 && observer.assignment("coop-b").len() == 2).then_some(())
        })
        .await
        .unwrap();
    let revoked_from_a: Vec<usize> = observer
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Revoked { subscriber, partitions } if &**subscriber == "coop-a" => Some(partitions.len()),
            _ => None,
        })
        .collect();
    println!("partitions revoked from coop-a when coop-b joined, per revocation: {revoked_from_a:?}");
    if !common::is_memory() {
        // Incremental (cooperative) rebalancing: the first member gives up only what moves to the second;
        // the eager protocol would revoke all four first.
        assert_eq!(revoked_from_a, vec![2], "cooperative-sticky moved only two partitions");
    }

    let published = common::publish_keyed(&broker, &topic, "m", 100, 20).await;
    observer
        .wait_until("all 100 messages handled", common::WAIT, |ev| {
            (handled_ok(ev).len() >= published.len()).then_some(())
        })
        .await
        .unwrap();
    let end = broker.end_offsets(&topic).await.unwrap();
    observer
        .wait_until("everything committed", common::WAIT, |ev| {
            let committed = committed_by_anyone(ev);
            end.iter()
                .all(|(p, o)| *o == 0 || committed.get(&TopicPartition::new(topic.as_str(), *p)) == Some(o))
                .then_some(())
        })
        .await
        .unwrap();
    let (a_owns, b_owns) = (observer.assignment("coop-a"), observer.assignment("coop-b"));
    app_b.shutdown().await.unwrap();
    app_a.shutdown().await.unwrap();

    assert_eq!((a_owns.len(), b_owns.len()), (2, 2), "a: {a_owns:?}, b: {b_owns:?}");
    let all: BTreeSet<i32> = a_owns.iter().chain(&b_owns).map(|tp| tp.partition).collect();
    assert_eq!(all, BTreeSet::from([0, 1, 2, 3]), "disjoint and covering");
    let events = observer.events();
    let mut handled = handled_ok(&events);
    handled.sort_unstable();
    let unique: BTreeSet<Coord> = handled.iter().copied().collect();
    assert_eq!(handled.len(), unique.len(), "no message handled twice: {handled:?}");
    assert_eq!(unique, published, "every message handled");
    for name in ["coop-a", "coop-b"] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Handled { subscriber, .. } if &**subscriber == name)),
            "`{name}` did some of the work"
        );
    }
    assert_eq!(commits_past_unsettled_offsets(&events), Vec::<String>::new());
    let expected: BTreeMap<i32, i64> = end.into_iter().filter(|(_, o)| *o > 0).collect();
    assert_eq!(broker.committed_offsets(&group, &topic).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_first_revocation_handles_what_it_committed_ahead_within_a_short_drain() {
    // SPEC 3.4 and 3.7: AckFirst commits ahead of its handler; a graceful revocation (a member joins)
    // must still handle what was committed, or it is lost without any crash. The commit runs ahead by a
    // moment of the handler's work, so even a short drain window has room for it: nothing lost, nothing
    // handled twice.
    const MESSAGES: usize = 2_400;
    const DRAIN: Duration = Duration::from_millis(400);
    common::init_tracing();
    let seen = Seen::default();
    let broker = common::broker().with_state(seen.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "rebalance-ack-first", 4).await;
    let group = common::unique("g");
    let member = |name: &str| {
        common::member(&broker, &topic, name, &group)
            .ack_policy(ferrostream::AckPolicy::AckFirst)
            .drain_timeout(DRAIN)
            .handle(|msg: Message, State(seen): State<Seen>| async move {
                seen.0.lock().unwrap().push((msg.partition(), msg.offset()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            });
    };
    let acks = broker
        .publish_batch((0..MESSAGES).map(|i| broker.publish(format!("m{i}"), &topic).partition(i as i32 % 4)))
        .await;
    let published: BTreeSet<Coord> = acks
        .into_iter()
        .map(|a| {
            let a = a.expect("publish");
            (a.partition, a.offset)
        })
        .collect();
    member("amo-a");
    let app_a = common::start(&broker).await;
    wait_progress(&observer, 200).await;
    member("amo-b");
    let app_b = common::start(&broker).await;
    let end = broker.end_offsets(&topic).await.unwrap();
    observer
        .wait_until("the group committing the end of every partition", common::WAIT, |_| {
            let a = observer.committed("amo-a");
            let b = observer.committed("amo-b");
            end.iter()
                .all(|(p, o)| {
                    let tp = TopicPartition::new(topic.as_str(), *p);
                    a.get(&tp).max(b.get(&tp)).is_some_and(|c| c == o)
                })
                .then_some(())
        })
        .await
        .unwrap();
    // Committed everything: what is still to handle was committed ahead, and is handled now.
    observer
        .wait_until("every published message handled", common::WAIT, |_| {
            (seen.0.lock().unwrap().len() >= MESSAGES).then_some(())
        })
        .await
        .unwrap_or_else(|e| {
            let handled: BTreeSet<Coord> = seen.0.lock().unwrap().iter().copied().collect();
            let lost: Vec<_> = published.difference(&handled).take(20).collect();
            panic!("{e}: committed but never handled (lost without a crash), e.g. {lost:?}")
        });
    shut(app_b, "amo-b").await;
    shut(app_a, "amo-a").await;
    let handled = seen.0.lock().unwrap().clone();
    let distinct: BTreeSet<Coord> = handled.iter().copied().collect();
    let revocations = observer
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Revoked { subscriber, .. } if &**subscriber == "amo-a"))
        .count();
    println!(
        "{} handler calls, {} distinct, {revocations} revocations of amo-a",
        handled.len(),
        distinct.len()
    );
    assert!(revocations >= 1, "amo-b's join revoked partitions of amo-a");
    assert_eq!(distinct, published, "every message handled");
    assert_eq!(handled.len(), MESSAGES, "none handled twice");
}
