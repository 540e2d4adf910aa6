//! SPEC 3.4 and 3.5: when commits happen. `AckFirst` commits before the handler runs; `commit_sync_each`
//! commits each settle before the next dispatch; the default cadence batches commits; `commit_every`
//! triggers a commit before the interval ends.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::observe::Outcome;
use ferrostream::{AckPolicy, Broker, Event, Message, Observer, State, TopicPartition};
use futures::StreamExt;

/// Publishes `n` messages concurrently, spread over the topic's partitions by key.
async fn publish_many(broker: &Broker, topic: &str, n: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            broker
                .publish(format!("m{i}"), topic)
                .key(format!("key-{i}"))
                .into_future()
        })
        .buffer_unordered(32)
        .for_each(|r| async move {
            r.expect("publish");
        })
        .await;
}

/// What each handler call saw when it started: (partition, offset, the subscriber's highest committed
/// offset of that partition according to the observer at that moment).
#[derive(Clone, Default)]
struct StartLog(Arc<Mutex<Vec<Start>>>);

type Start = (i32, i64, Option<i64>);

/// A handler that notes, when it starts, how far the observer says its subscriber has committed.
async fn note_committed_at_start(msg: Message, State(observer): State<Observer>, State(log): State<StartLog>) {
    let committed = observer.committed(msg.subscriber()).get(msg.topic_partition()).copied();
    log.0.lock().unwrap().push((msg.partition(), msg.offset(), committed));
}

fn committed_events(events: &[Event], subscriber: &str) -> Vec<(TopicPartition, i64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Committed {
                subscriber: s,
                tp,
                offset,
            } if &**s == subscriber => Some((tp.clone(), *offset)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_first_commits_before_the_handler_runs() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let log = StartLog::default();
    let broker = broker.with_state(observer.clone()).with_state(log.clone());
    let topic = common::topic(&broker, "commits-ack-first", 2).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "at-most-once", &group)
        .ack_policy(AckPolicy::AckFirst)
        .handle(note_committed_at_start);
    let app = common::start(&broker).await;
    publish_many(&broker, &topic, 200).await;
    let end = broker.end_offsets(&topic).await.unwrap();
    assert_eq!(end.len(), 2);
    assert!(end.values().all(|o| *o > 0), "both partitions got messages: {end:?}");
    observer.wait_handled("at-most-once", 200, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    // From the ordered log: each handler call comes after a commit past its message.
    let events = observer.events();
    let mut committed: HashMap<&TopicPartition, i64> = HashMap::new();
    let mut violations = Vec::new();
    let mut handled = Vec::new();
    for e in &events {
        match e {
            Event::Committed { subscriber, tp, offset } if &**subscriber == "at-most-once" => {
                let c = committed.entry(tp).or_insert(*offset);
                *c = (*c).max(*offset);
            }
            Event::Handled {
                subscriber,
                tp,
                offset,
                outcome,
                ..
            } if &**subscriber == "at-most-once" => {
                assert_eq!(*outcome, Outcome::Ok);
                handled.push((tp.partition, *offset));
                let c = committed.get(tp).copied();
                if c.is_none_or(|c| c <= *offset) {
                    violations.push(format!("{tp}@{offset} handled when the commit was only at {c:?}"));
                }
            }
            _ => {}
        }
    }
    assert_eq!(violations, Vec::<String>::new());
    // ...and already when it started, not only by the time it ended.
    let early: Vec<_> = log
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, offset, c)| c.is_none_or(|c| c <= *offset))
        .copied()
        .collect();
    assert_eq!(
        early,
        Vec::new(),
        "handlers that started before their commit was confirmed"
    );

    let unique: BTreeSet<_> = handled.iter().copied().collect();
    let expected: BTreeSet<_> = end.iter().flat_map(|(p, o)| (0..*o).map(move |o| (*p, o))).collect();
    assert_eq!(handled.len(), 200, "each message handled once");
    assert_eq!(unique, expected);
    assert_eq!(broker.committed_offsets(&group, &topic).await.unwrap(), end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_sync_each_commits_every_settle_before_the_next_dispatch() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let log = StartLog::default();
    let broker = broker.with_state(observer.clone()).with_state(log.clone());
    let topic = common::topic(&broker, "commits-sync-each", 1).await;
    let group = common::unique("g");
    // Everything is there before the consumer starts: only the commits can hold the dispatch back.
    for i in 0..20 {
        broker.publish(format!("m{i}"), &topic).await.unwrap();
    }
    common::member(&broker, &topic, "sync-each", &group)
        .auto_commit(false)
        .commit_sync_each()
        .handle(note_committed_at_start);
    let app = common::start(&broker).await;
    let tp = TopicPartition::new(topic.as_str(), 0);
    observer
        .wait_committed("sync-each", &tp, 20, common::WAIT)
        .await
        .unwrap();

    let events = observer.events();
    let mut committed: Option<i64> = None;
    let mut handled = Vec::new();
    let mut violations = Vec::new();
    for e in &events {
        match e {
            Event::Committed { subscriber, offset, .. } if &**subscriber == "sync-each" => {
                committed = committed.max(Some(*offset));
            }
            Event::Handled {
                subscriber,
                offset,
                outcome,
                ..
            } if &**subscriber == "sync-each" => {
                assert_eq!(*outcome, Outcome::Ok);
                handled.push(*offset);
                if *offset > 0 && committed.is_none_or(|c| c < *offset) {
                    violations.push(format!(
                        "offset {offset} handled when the commit was only at {committed:?}"
                    ));
                }
            }
            _ => {}
        }
    }
    assert_eq!(violations, Vec::<String>::new());
    assert_eq!(handled, (0..20).collect::<Vec<_>>(), "each message once, in order");
    // Each settle got its own commit, in order, before the shutdown.
    let commits: Vec<i64> = committed_events(&events, "sync-each").iter().map(|(_, o)| *o).collect();
    assert_eq!(commits, (1..=20).collect::<Vec<_>>(), "one commit per settle");
    // The stronger form: when message i started, the settle of i - 1 was already committed.
    let starts = log.0.lock().unwrap().clone();
    let expected: Vec<_> = (0..20).map(|i| (0, i, (i > 0).then_some(i))).collect();
    assert_eq!(
        starts, expected,
        "(partition, offset, committed when the handler started)"
    );
    app.shutdown().await.unwrap();
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap(),
        broker.end_offsets(&topic).await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_cadence_batches_commits() {
    const MESSAGES: usize = 2000;
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "commits-cadence", 1).await;
    let group = common::unique("g");
    publish_many(&broker, &topic, MESSAGES).await;
    common::member(&broker, &topic, "cadence", &group)
        .auto_commit(false)
        .handle(|_: String| async {});
    let app = common::start(&broker).await;
    let tp = TopicPartition::new(topic.as_str(), 0);
    observer
        .wait_committed("cadence", &tp, MESSAGES as i64, common::WAIT)
        .await
        .unwrap();
    let commits = committed_events(&observer.events(), "cadence");
    app.shutdown().await.unwrap();

    println!(
        "{} commits for {MESSAGES} settles: {:?}",
        commits.len(),
        commits.iter().map(|(_, o)| *o).collect::<Vec<_>>()
    );
    assert!(
        commits.len() < 200,
        "{} commits for {MESSAGES} messages: commits are batched",
        commits.len()
    );
    let offsets: Vec<i64> = commits.iter().map(|(_, o)| *o).collect();
    assert!(offsets.is_sorted(), "commits land in order: {offsets:?}");
    assert_eq!(observer.handled("cadence").len(), MESSAGES, "each message handled once");
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&(MESSAGES as i64))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_every_triggers_before_the_interval() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "commits-every", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "every-10", &group)
        .auto_commit(false)
        .commit_interval(Duration::from_secs(3600))
        .commit_every(10)
        .handle(|_: String| async {});
    let app = common::start(&broker).await;
    let tp = TopicPartition::new(topic.as_str(), 0);
    // The interval is an hour, so only the count can trigger these commits. Ten rounds of ten messages:
    // each round's tenth settle must trigger a commit of the round, with nothing else to commit. (Publishing
    // all 100 at once would let settles that arrive while a commit is in flight join the next batch, and a
    // final batch of fewer than ten settles would then rightly wait for the interval.)
    for round in 1..=10i64 {
        for i in 0..10 {
            broker.publish(format!("r{round}-m{i}"), &topic).await.expect("publish");
        }
        if let Err(e) = observer.wait_committed("every-10", &tp, 10 * round, common::WAIT).await {
            let commits = committed_events(&observer.events(), "every-10");
            let settled = observer.settled("every-10").len();
            app.shutdown().await.unwrap();
            panic!("{e}; {settled} settles; commits so far: {commits:?}");
        }
    }
    let commits: Vec<i64> = committed_events(&observer.events(), "every-10")
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    app.shutdown().await.unwrap();
    assert_eq!(
        commits,
        (1..=10).map(|r| 10 * r).collect::<Vec<_>>(),
        "one commit per ten settles, before the shutdown"
    );
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&100)
    );
}

/// Guarantee 3.1's other side: an unsettled message that holds its partition's commit back while later
/// ones are settled is named in a warning (and a `Stalled` event) once it has done so for longer than the
/// subscriber's threshold; a partition whose settles come in order never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_that_holds_the_commit_back_is_named_after_the_threshold() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "stall", 1).await;
    let threshold = std::time::Duration::from_millis(200);
    common::member(&broker, &topic, "forgetful", &common::unique("g"))
        .ack_policy(ferrostream::AckPolicy::Manual)
        .max_in_flight(4)
        .stall_warning(threshold)
        .handle(|body: String, msg: ferrostream::Message| async move {
            if body != "held" {
                let _ = msg.ack().await; // forgets to settle "held"
            }
        });
    let app = common::start(&broker).await;
    let held = broker.publish("held", &topic).key("a").await.unwrap();
    broker.publish("later-1", &topic).key("b").await.unwrap();
    observer.wait_settled("forgetful", 1, common::WAIT).await.unwrap();
    // The behaviour under test is a duration: let it pass, then settle one more.
    tokio::time::sleep(threshold + std::time::Duration::from_millis(50)).await;
    broker.publish("later-2", &topic).key("c").await.unwrap();
    let stalled = observer
        .wait_until("a Stalled event", common::WAIT, |events| {
            events.iter().find_map(|e| match e {
                Event::Stalled {
                    offset, stalled_for, ..
                } => Some((*offset, *stalled_for)),
                _ => None,
            })
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        stalled.0, held.offset,
        "the warning names the offset that holds the commit"
    );
    assert!(stalled.1 >= threshold, "{:?}", stalled.1);
    let stalls = observer
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Stalled { .. }))
        .count();
    assert_eq!(stalls, 1, "said once per stalled offset");
}

/// Partitions whose handler call is running right now, the most that ever ran together, and when the
/// first call started.
type Running = (BTreeSet<i32>, usize, Option<std::time::Instant>);

#[derive(Clone, Default)]
struct Concurrency(Arc<Mutex<Running>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_first_commits_only_a_moment_of_a_slow_handlers_work_ahead_and_runs_every_partition() {
    // SPEC 3.4: AckFirst's commits run ahead of the handler only by what keeps it busy (runs of half a
    // commit interval of its measured pace), so a crash loses a moment of work, not a fixed 16,384
    // records; and a slow handler works on every assigned partition at once.
    const PARTITIONS: i32 = 4;
    const MESSAGES: usize = 1_000;
    const HANDLER: Duration = Duration::from_millis(2);
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let running = Concurrency::default();
    let broker = broker.with_state(running.clone());
    let topic = common::topic(&broker, "commits-af-slow", PARTITIONS).await;
    common::member(&broker, &topic, "slow", &common::unique("g"))
        .ack_policy(AckPolicy::AckFirst)
        .handle(|msg: Message, State(running): State<Concurrency>| async move {
            {
                let mut r = running.0.lock().unwrap();
                r.0.insert(msg.partition());
                r.1 = r.1.max(r.0.len());
                r.2.get_or_insert_with(std::time::Instant::now);
            }
            tokio::time::sleep(HANDLER).await;
            running.0.lock().unwrap().0.remove(&msg.partition());
        });
    publish_many(&broker, &topic, MESSAGES).await;
    let app = common::start(&broker).await;
    observer.wait_handled("slow", MESSAGES, common::WAIT).await.unwrap();
    let took = running.0.lock().unwrap().2.expect("a call started").elapsed();
    app.shutdown().await.unwrap();

    let together = running.0.lock().unwrap().1;
    assert_eq!(
        together, PARTITIONS as usize,
        "AckFirst ran handler calls of at most {together} partitions at once"
    );
    // What a crash would have lost at each commit: committed but not yet handled (in flight included).
    let rate = MESSAGES as f64 / PARTITIONS as f64 / took.as_secs_f64();
    let bound = (rate * 0.2).ceil() as i64 + 1;
    let mut handled: HashMap<TopicPartition, i64> = HashMap::new();
    let mut worst = 0;
    for e in observer.events() {
        match e {
            Event::Handled { subscriber, tp, .. } if &*subscriber == "slow" => *handled.entry(tp).or_default() += 1,
            Event::Committed { subscriber, tp, offset } if &*subscriber == "slow" => {
                worst = worst.max(offset - handled.get(&tp).copied().unwrap_or(0));
            }
            _ => {}
        }
    }
    println!(
        "{MESSAGES} messages in {took:?} ({rate:.0}/s a partition); at most {worst} committed ahead of the \
         handler (bound: 200 ms of its work + 1 = {bound})"
    );
    assert!(
        worst <= bound,
        "AckFirst committed {worst} records ahead of a handler doing {rate:.0}/s: more than 200 ms of its work"
    );
}
