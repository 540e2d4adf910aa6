//! SPEC 3.7 and section 4: consumer groups share partitions, separate groups each see everything, and a
//! member that leaves hands its partitions to the others, who resume from the committed offset.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferrostream::observe::Outcome;
use ferrostream::{Event, Observer, TopicPartition};

/// (partition, offset) of a handled or published message.
type Coord = (i32, i64);

/// Every handler call of `subscriber` that succeeded, as (partition, offset).
fn handled_ok(observer: &Observer, subscriber: &str) -> Vec<Coord> {
    observer
        .handled(subscriber)
        .into_iter()
        .filter(|h| h.3 == Outcome::Ok)
        .map(|(tp, offset, _, _)| (tp.partition, offset))
        .collect()
}

/// Replays the event log and returns every handler call made on a partition its subscriber did not own
/// at that moment.
fn calls_outside_assignment(events: &[Event]) -> Vec<String> {
    let mut owned: BTreeMap<&str, BTreeSet<&TopicPartition>> = BTreeMap::new();
    let mut stray = Vec::new();
    for e in events {
        match e {
            Event::Assigned { subscriber, partitions } => owned.entry(subscriber).or_default().extend(partitions),
            Event::Revoked { subscriber, partitions } => {
                let set = owned.entry(subscriber).or_default();
                for p in partitions {
                    set.remove(p);
                }
            }
            Event::Handled {
                subscriber, tp, offset, ..
            } if !owned.get(&**subscriber).is_some_and(|s| s.contains(tp)) => {
                stray.push(format!("{subscriber} handled {tp}@{offset} without owning it"));
            }
            _ => {}
        }
    }
    stray
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_a_group_split_the_partitions_and_handle_each_message_once() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "groups-split", 4).await;
    let group = common::unique("g");
    for name in ["member-a", "member-b"] {
        common::member(&broker, &topic, name, &group)
            .auto_commit(false)
            .handle(|_: String| async {});
    }
    let app = common::start(&broker).await;
    // The second join may rebalance once more after the app started: publish once the split is done.
    observer
        .wait_until("a 2/2 split of the four partitions", common::WAIT, |_| {
            (observer.assignment("member-a").len() == 2 && observer.assignment("member-b").len() == 2).then_some(())
        })
        .await
        .unwrap();

    let published = common::publish_keyed(&broker, &topic, "m", 100, 20).await;
    observer
        .wait_until("all 100 messages handled by the group", common::WAIT, |_| {
            let n = handled_ok(&observer, "member-a").len() + handled_ok(&observer, "member-b").len();
            (n >= published.len()).then_some(())
        })
        .await
        .unwrap();
    let (a_owns, b_owns) = (observer.assignment("member-a"), observer.assignment("member-b"));
    // Each member commits its own partitions on the commit cadence, while the group is running.
    let end = broker.end_offsets(&topic).await.unwrap();
    observer
        .wait_until("both members committing everything", common::WAIT, |_| {
            let mut committed = observer.committed("member-a");
            committed.extend(observer.committed("member-b"));
            end.iter()
                .all(|(p, o)| *o == 0 || committed.get(&TopicPartition::new(topic.as_str(), *p)) == Some(o))
                .then_some(())
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();

    assert_eq!((a_owns.len(), b_owns.len()), (2, 2), "a: {a_owns:?}, b: {b_owns:?}");
    let all: BTreeSet<_> = a_owns.iter().chain(&b_owns).map(|tp| tp.partition).collect();
    assert_eq!(
        all,
        BTreeSet::from([0, 1, 2, 3]),
        "the members' partitions are disjoint and cover the topic"
    );

    let (a, b) = (handled_ok(&observer, "member-a"), handled_ok(&observer, "member-b"));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both members did work: a {}, b {}",
        a.len(),
        b.len()
    );
    let mut handled: Vec<Coord> = a.iter().chain(&b).copied().collect();
    handled.sort_unstable();
    let unique: BTreeSet<Coord> = handled.iter().copied().collect();
    assert_eq!(handled.len(), unique.len(), "no message handled twice: {handled:?}");
    assert_eq!(unique, published, "every published message handled");
    assert_eq!(calls_outside_assignment(&observer.events()), Vec::<String>::new());

    let committed = broker.committed_offsets(&group, &topic).await.unwrap();
    let expected: BTreeMap<i32, i64> = end.into_iter().filter(|(_, o)| *o > 0).collect();
    assert_eq!(committed, expected, "the group committed everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_see_every_message() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "groups-fanout", 3).await;
    let groups = [common::unique("g1"), common::unique("g2")];
    for (name, group) in ["first", "second"].iter().zip(&groups) {
        common::member(&broker, &topic, name, group)
            .auto_commit(false)
            .handle(|_: String| async {});
    }
    let app = common::start(&broker).await;
    let published = common::publish_keyed(&broker, &topic, "m", 30, 30).await;
    for name in ["first", "second"] {
        observer
            .wait_handled(name, published.len(), common::WAIT)
            .await
            .unwrap();
    }
    let end = broker.end_offsets(&topic).await.unwrap();
    for name in ["first", "second"] {
        observer
            .wait_until("the group committed everything", common::WAIT, |_| {
                let c = observer.committed(name);
                end.iter()
                    .all(|(p, o)| *o == 0 || c.get(&TopicPartition::new(topic.as_str(), *p)) == Some(o))
                    .then_some(())
            })
            .await
            .unwrap();
    }
    app.shutdown().await.unwrap();

    for (name, group) in ["first", "second"].iter().zip(&groups) {
        let handled = handled_ok(&observer, name);
        let unique: BTreeSet<Coord> = handled.iter().copied().collect();
        assert_eq!(handled.len(), published.len(), "`{name}` handled each message once");
        assert_eq!(unique, published, "`{name}` saw every message");
        let committed = broker.committed_offsets(group, &topic).await.unwrap();
        let expected: BTreeMap<i32, i64> = end.iter().filter(|(_, o)| **o > 0).map(|(p, o)| (*p, *o)).collect();
        assert_eq!(committed, expected, "group of `{name}` committed its own offsets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_hands_its_partitions_over_from_the_committed_offset() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "groups-handover", 2).await;
    let group = common::unique("g");
    let subscribe = |name: &str| {
        common::member(&broker, &topic, name, &group)
            .auto_commit(false)
            .handle(|_: String| async {});
    };

    subscribe("leaver");
    let app1 = common::start(&broker).await;
    let first = common::publish_keyed(&broker, &topic, "first-", 10, 10).await;
    let end_before = broker.end_offsets(&topic).await.unwrap();
    for (p, o) in &end_before {
        if *o > 0 {
            observer
                .wait_committed("leaver", &TopicPartition::new(topic.as_str(), *p), *o, common::WAIT)
                .await
                .unwrap();
        }
    }
    let committed_before = broker.committed_offsets(&group, &topic).await.unwrap();
    assert_eq!(committed_before.values().sum::<i64>(), 10, "{committed_before:?}");

    // The second member joins the running group: a later App starts only the subscribers declared
    // since the previous one started.
    subscribe("heir");
    let app2 = common::start(&broker).await;
    app1.shutdown().await.unwrap();
    observer
        .wait_until("the heir owning both partitions", common::WAIT, |_| {
            (observer.assignment("heir").len() == 2).then_some(())
        })
        .await
        .unwrap();

    let second = common::publish_keyed(&broker, &topic, "second-", 10, 10).await;
    observer
        .wait_until("the heir handling every new message", common::WAIT, |_| {
            let h: BTreeSet<Coord> = handled_ok(&observer, "heir").into_iter().collect();
            second.is_subset(&h).then_some(())
        })
        .await
        .unwrap();
    app2.shutdown().await.unwrap();

    let leaver = handled_ok(&observer, "leaver");
    assert_eq!(leaver.iter().copied().collect::<BTreeSet<_>>(), first);
    assert_eq!(
        leaver.len(),
        10,
        "the leaver handled each first message once: {leaver:?}"
    );
    let heir = handled_ok(&observer, "heir");
    assert_eq!(
        heir.iter().copied().collect::<BTreeSet<_>>(),
        second,
        "the heir resumed at the committed offsets {committed_before:?}: nothing of the first ten again"
    );
    assert_eq!(heir.len(), 10, "each new message handled once: {heir:?}");
    assert_eq!(calls_outside_assignment(&observer.events()), Vec::<String>::new());
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap(),
        broker.end_offsets(&topic).await.unwrap()
    );
}

/// The in-memory broker models a crash as Kafka does: a member that goes away without leaving (its task
/// aborted: no drain, no final commit) keeps its partitions until its session times out; then they move
/// to the rest of the group from their last committed offsets, so what it handled uncommitted comes
/// again. (On Kafka, `kafka_crash` proves the same by killing processes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_crashed_members_partitions_move_after_its_session_timeout() {
    if !common::is_memory() {
        return;
    }
    common::init_tracing();
    const SESSION: Duration = Duration::from_millis(700);
    let broker = ferrostream::Broker::new(&format!("memory://?session.timeout.ms={}", SESSION.as_millis())).unwrap();
    let observer = broker.observer();
    broker.create_topic("crash", 2).await.unwrap();
    let subscribe = |name: &str| {
        common::member(&broker, "crash", name, "g")
            // At least once, and nothing committed before the crash.
            .auto_commit(false)
            .commit_interval(Duration::from_secs(3600))
            .handle(|_: String| async {});
    };
    subscribe("crasher");
    let crasher = common::start(&broker).await;
    subscribe("survivor");
    let survivor = common::start(&broker).await;
    observer
        .wait_until("one partition each", common::WAIT, |_| {
            (observer.assignment("crasher").len() == 1 && observer.assignment("survivor").len() == 1).then_some(())
        })
        .await
        .unwrap();
    let lost = observer.assignment("crasher")[0].clone();
    let mut published = BTreeSet::new();
    for i in 0..20 {
        let ack = broker.publish(format!("m{i}"), "crash").partition(i % 2).await.unwrap();
        published.insert((ack.partition, ack.offset));
    }
    observer
        .wait_until("every message handled once", common::WAIT, |_| {
            let h: BTreeSet<Coord> = handled_ok(&observer, "crasher")
                .into_iter()
                .chain(handled_ok(&observer, "survivor"))
                .collect();
            (h == published).then_some(())
        })
        .await
        .unwrap();

    let crashed = tokio::time::Instant::now();
    crasher.abort().await;
    observer
        .wait_until("the survivor owning both partitions", common::WAIT, |_| {
            (observer.assignment("survivor").len() == 2).then_some(())
        })
        .await
        .unwrap();
    let moved_after = crashed.elapsed();
    assert!(
        moved_after >= SESSION,
        "the crashed member kept its partition for its session: moved after {moved_after:?}"
    );
    assert!(
        moved_after < SESSION + Duration::from_secs(5),
        "then it moved: {moved_after:?}"
    );
    // The crasher's uncommitted messages come again, from the partition's start.
    let again: BTreeSet<Coord> = published
        .iter()
        .filter(|(p, _)| *p == lost.partition)
        .copied()
        .collect();
    observer
        .wait_until(
            "the survivor handling the crashed member's messages",
            common::WAIT,
            |_| {
                let h: BTreeSet<Coord> = handled_ok(&observer, "survivor").into_iter().collect();
                again.is_subset(&h).then_some(())
            },
        )
        .await
        .unwrap();
    survivor.shutdown().await.unwrap();
    assert_eq!(
        broker.committed_offsets("g", "crash").await.unwrap(),
        broker.end_offsets("crash").await.unwrap()
    );
}
