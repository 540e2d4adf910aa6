//! Engine rules tested with a scripted transport.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::config::SubscriberConfig;
use crate::error::{BrokerError, PublishError};
use crate::handler::Erased;
use crate::log::{Commits, LogConsumer, LogEvent, LogTransport};
use crate::message::{Headers, Record};
use crate::transport::{Outgoing, PublishAck};

/// Where the engine's publishes go in these tests: nowhere (no test here publishes).
struct NoPublisher;

impl Publisher for NoPublisher {
    fn send(&self, _: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        Box::pin(std::future::ready(Err(BrokerError::Closed.into())))
    }
}

/// A subscriber's runtime without any broker: the engine's rules need none.
fn runtime(cfg: SubscriberConfig) -> (Arc<SubscriberRuntime>, Hooks) {
    let hooks = Hooks::default();
    let handler = |_: Bytes| async {};
    let rt = Arc::new(SubscriberRuntime {
        cfg: cfg.resolve(true).expect("valid config"),
        handler: Arc::new(Erased::new(handler)),
        service: None,
        state: Default::default(),
        publisher: Arc::new(NoPublisher),
        hooks: hooks.clone(),
        counters: Arc::new(Counters::default()),
    });
    (rt, hooks)
}

/// A transport the test drives: it pushes the events, and each commit finishes only when the test
/// releases it.
struct Scripted {
    events: mpsc::UnboundedReceiver<LogEvent>,
    log: Arc<Mutex<Vec<String>>>,
    sent: Arc<Notify>,
    release: Arc<Semaphore>,
}

impl LogConsumer for Scripted {
    async fn next(&mut self) -> Option<LogEvent> {
        self.events.recv().await
    }
    fn pause(&mut self, _: &TopicPartition) {}
    fn resume(&mut self, _: &TopicPartition) {}
    fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (log, release) = (self.log.clone(), self.release.clone());
        self.sent.notify_one();
        Box::pin(async move {
            release.acquire().await.expect("never closed").forget();
            let offsets: Vec<i64> = commits.iter().map(|(_, o)| *o).collect();
            log.lock().expect("log").push(format!("committed {offsets:?}"));
            Ok(())
        })
    }
    async fn close(self, _: Commits) -> Result<(), BrokerError> {
        Ok(())
    }
}

fn record(tp: &TopicPartition, offset: i64) -> Record {
    Record {
        tp: tp.clone(),
        offset,
        key: None,
        payload: Bytes::from_static(b"x"),
        headers: Headers::new(),
        timestamp: None,
        prior_attempts: 0,
        attempts: 0,
    }
}

/// SPEC 3.7 with a slow broker: a revoke's drain runs out of time while a commit is in flight. The
/// engine waits (bounded) for that commit before it hands over the final offsets, so the in-flight
/// commit cannot land after the final one and move the committed offset back.
#[tokio::test]
async fn a_drain_past_its_deadline_lets_the_commit_in_flight_land_before_the_final_offsets() {
    let mut cfg = SubscriberConfig::new("t");
    cfg.group_id = Some("g".into());
    cfg.ack_policy = Some(AckPolicy::NackOnError);
    cfg.commit_every = 1;
    cfg.drain_timeout = Duration::from_millis(50);
    let (rt, hooks) = runtime(cfg);
    let (tx, events) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (sent, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let transport = Scripted {
        events,
        log: log.clone(),
        sent: sent.clone(),
        release: release.clone(),
    };
    let (_stop, stop_rx) = watch::channel(false);
    let (ready_tx, ready) = oneshot::channel();
    let transport = LogTransport::new(transport, &rt.cfg, hooks, rt.counters.clone());
    let engine = tokio::spawn(Engine::new(transport, rt, stop_rx, ready_tx).run());
    let wait = Duration::from_secs(5);

    let tp = TopicPartition::new("t", 0);
    assert!(tx.send(LogEvent::Assigned(vec![tp.clone()])).is_ok(), "engine runs");
    tokio::time::timeout(wait, ready)
        .await
        .expect("assigned")
        .expect("ready");
    assert!(tx.send(LogEvent::Records(vec![record(&tp, 0)])).is_ok(), "engine runs");
    tokio::time::timeout(wait, sent.notified())
        .await
        .expect("the record's commit is sent");

    let (replied_tx, mut replied) = oneshot::channel();
    let reply_log = log.clone();
    let reply = Box::new(move |commits: Commits| {
        let offsets: Vec<i64> = commits.iter().map(|(_, o)| *o).collect();
        reply_log.lock().expect("log").push(format!("final {offsets:?}"));
        let _ = replied_tx.send(());
    });
    let revoked = LogEvent::Revoked {
        partitions: vec![tp.clone()],
        reply,
    };
    assert!(tx.send(revoked).is_ok(), "engine runs");
    // Well past the 50 ms drain deadline, the engine still waits for the commit in flight.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut replied)
            .await
            .is_err(),
        "the final offsets were handed over with a commit still in flight: {:?}",
        log.lock().expect("log")
    );
    release.add_permits(1);
    tokio::time::timeout(wait, replied)
        .await
        .expect("the drain ends")
        .expect("replied");
    assert_eq!(*log.lock().expect("log"), ["committed [1]", "final []"]);
    drop(tx);
    tokio::time::timeout(wait, engine)
        .await
        .expect("the engine stops")
        .expect("no panic");
}
