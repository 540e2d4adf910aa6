//! The in-memory broker (`memory://`): a deterministic model of Kafka semantics (SPEC section 4).
//!
//! Topics have partitions (keys hashed with Kafka's murmur2, so a key lands where a Java client would
//! put it); consumer groups keep committed offsets; members get partitions by the range assignor, with an
//! eager rebalance whenever a member joins or leaves: every member's partitions are revoked (each member
//! drains and commits first), then the new assignment starts from the committed offsets or the reset
//! policy. Pause and resume behave as on Kafka. Commits from a member that no longer owns a
//! partition are refused per partition (the others land), as Kafka refuses commits of a stale
//! generation. A member that goes away without leaving (a crash: its task aborted) keeps its partitions
//! until its session times out (`memory://?session.timeout.ms=MS`, 10 s by default), then the group
//! rebalances without it.

mod murmur;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot};

use tokio::task::JoinHandle;

use super::{Backend, LogAdmin, spawn_log};
use crate::config::{OffsetReset, ResolvedSubscriber};
use crate::engine::Launch;
use crate::error::{AdminError, BrokerError, ConfigError, PublishError, StartError};
use crate::log::{Commits, LogConsumer, LogEvent, MAX_MESSAGE_BYTES, check_topic_name, record_size};
use crate::message::{Headers, Record};
use crate::offset::TopicPartition;
use crate::transport::{Outgoing, PublishAck, Publisher, no_exchanges};

/// How long a rebalance waits for a member beyond the member's own drain timeout.
const REVOKE_GRACE: Duration = Duration::from_secs(5);
/// Records handed to the engine per fetch, per partition.
const FETCH_MAX: usize = 512;
/// How long a crashed member keeps its partitions by default (`session.timeout.ms`, as the Kafka
/// consumers are configured).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

struct Stored {
    key: Option<bytes::Bytes>,
    payload: bytes::Bytes,
    headers: Headers,
    timestamp: i64,
}

#[derive(Default)]
struct Topic {
    partitions: Vec<Vec<Stored>>,
    round_robin: usize,
}

enum Control {
    Assign(Vec<(TopicPartition, i64)>),
    Revoke(Vec<TopicPartition>, oneshot::Sender<Commits>),
}

struct Member {
    /// The subscriber's name, for logs.
    name: Arc<str>,
    topic: Arc<str>,
    reset: OffsetReset,
    /// How long the member may take to drain a revocation (or its shutdown).
    drain_timeout: Duration,
    control: mpsc::UnboundedSender<Control>,
    owned: Vec<TopicPartition>,
}

#[derive(Default)]
struct Group {
    committed: HashMap<TopicPartition, i64>,
    members: BTreeMap<u64, Member>,
    rebalance: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct State {
    topics: HashMap<Arc<str>, Topic>,
    groups: HashMap<String, Group>,
}

struct Shared {
    state: Mutex<State>,
    data: Notify,
    default_partitions: i32,
    /// How long a member that went away without leaving (a crash) keeps its partitions.
    session_timeout: Duration,
    next_member: AtomicU64,
}

/// The in-memory broker. Cheap to clone; clones share topics and groups.
#[derive(Clone)]
pub(crate) struct MemoryBroker {
    shared: Arc<Shared>,
}

impl MemoryBroker {
    fn new(default_partitions: i32, session_timeout: Duration) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                data: Notify::new(),
                default_partitions,
                session_timeout,
                next_member: AtomicU64::new(1),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.shared)
    }

    pub(crate) fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), AdminError> {
        let mut st = self.lock();
        let t = st.topics.entry(topic.into()).or_default();
        if (t.partitions.len() as i32) < partitions {
            t.partitions.resize_with(partitions as usize, Vec::new);
        }
        Ok(())
    }

    fn append(&self, out: Outgoing) -> Result<PublishAck, PublishError> {
        no_exchanges(&out)?;
        // What Kafka would refuse, refused here too.
        check_topic_name(&out.topic).map_err(|reason| PublishError::InvalidTopic {
            topic: out.topic.clone(),
            reason,
        })?;
        let size = record_size(&out);
        if size > MAX_MESSAGE_BYTES {
            return Err(PublishError::TooLarge {
                size,
                max: MAX_MESSAGE_BYTES,
            });
        }
        let ack = {
            let mut st = self.lock();
            let default_partitions = self.shared.default_partitions;
            let topic = topic_entry(&mut st, &out.topic, default_partitions);
            let n = topic.partitions.len() as i32;
            let partition = match (out.partition, &out.key) {
                (Some(p), _) if p < 0 || p >= n => {
                    return Err(PublishError::UnknownPartition {
                        topic: out.topic,
                        partition: p,
                    });
                }
                (Some(p), _) => p,
                (None, Some(key)) => murmur::partition_for(key, n),
                (None, None) => {
                    topic.round_robin = topic.round_robin.wrapping_add(1);
                    (topic.round_robin % n as usize) as i32
                }
            };
            let log = &mut topic.partitions[partition as usize];
            let offset = log.len() as i64;
            log.push(Stored {
                key: out.key,
                payload: out.payload,
                headers: out.headers,
                timestamp: out.timestamp.unwrap_or_else(now_millis),
            });
            PublishAck {
                topic: out.topic,
                partition,
                offset,
            }
        };
        self.shared.data.notify_waiters();
        Ok(ack)
    }

    /// The committed offsets of a group for a topic, by partition.
    pub(crate) fn committed(&self, group: &str, topic: &str) -> BTreeMap<i32, i64> {
        let st = self.lock();
        st.groups
            .get(group)
            .map(|g| {
                g.committed
                    .iter()
                    .filter(|(tp, _)| &*tp.topic == topic)
                    .map(|(tp, o)| (tp.partition, *o))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The next offset to be written, by partition.
    pub(crate) fn end_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        let st = self.lock();
        st.topics
            .get(topic)
            .map(|t| {
                t.partitions
                    .iter()
                    .enumerate()
                    .map(|(p, l)| (p as i32, l.len() as i64))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Joins the subscriber's group (a private one without a group) as a member consuming its topic.
    pub(crate) fn join(&self, cfg: &ResolvedSubscriber) -> MemoryConsumer {
        let drain_timeout = cfg.revocation_drain();
        let (topic, reset) = (cfg.topic.as_str(), cfg.auto_offset_reset);
        let member = self.shared.next_member.fetch_add(1, Ordering::Relaxed);
        let group = cfg
            .group_id
            .as_deref()
            .map_or_else(|| format!("__private-{member}"), str::to_owned);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.lock();
            let default_partitions = self.shared.default_partitions;
            topic_entry(&mut st, topic, default_partitions);
            let g = st.groups.entry(group.clone()).or_default();
            g.members.insert(
                member,
                Member {
                    name: cfg.name.clone(),
                    topic: topic_name(topic),
                    reset,
                    drain_timeout,
                    control: tx,
                    owned: Vec::new(),
                },
            );
        }
        tokio::spawn(rebalance(self.shared.clone(), group.clone()));
        MemoryConsumer {
            shared: self.shared.clone(),
            group,
            member,
            control: rx,
            cursors: BTreeMap::new(),
            left: false,
        }
    }
}

fn topic_name(topic: &str) -> Arc<str> {
    topic.into()
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    // Every mutation below leaves the state consistent before any call that could panic.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn topic_entry<'a>(st: &'a mut State, topic: &str, default_partitions: i32) -> &'a mut Topic {
    st.topics.entry(topic.into()).or_insert_with(|| Topic {
        partitions: (0..default_partitions).map(|_| Vec::new()).collect(),
        round_robin: 0,
    })
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Eager rebalance of one group: revoke everything, wait for the members' final commits, assign by
/// ranges. Serialised per group.
async fn rebalance(shared: Arc<Shared>, group: String) {
    let serial = {
        let mut st = lock(&shared);
        st.groups.entry(group.clone()).or_default().rebalance.clone()
    };
    let _turn = serial.lock().await;

    // A member keeps owning its partitions until it answers the revocation (or goes away), so a member
    // that is closing meanwhile can still make its final commit.
    let pending: Vec<(u64, Duration, oneshot::Receiver<Commits>)> = {
        let mut st = lock(&shared);
        let Some(g) = st.groups.get_mut(&group) else { return };
        g.members
            .iter()
            .filter(|(_, m)| !m.owned.is_empty())
            .filter_map(|(id, m)| {
                let (tx, rx) = oneshot::channel();
                let wait = m.drain_timeout + REVOKE_GRACE;
                tracing::debug!(subscriber = %m.name, partitions = %crate::offset::Shown(&m.owned[..]),
                    "partitions revoked; waiting for the member to drain them");
                m.control
                    .send(Control::Revoke(m.owned.clone(), tx))
                    .ok()
                    .map(|_| (*id, wait, rx))
            })
            .collect()
    };
    for (id, wait, rx) in pending {
        // A member that went away answers nothing: its partitions keep their last committed offsets.
        let answer = tokio::time::timeout(wait, rx).await;
        let mut st = lock(&shared);
        if let Some(g) = st.groups.get_mut(&group) {
            if let Ok(Ok(commits)) = answer {
                for (tp, o) in commits {
                    g.committed.insert(tp, o);
                }
            }
            if let Some(m) = g.members.get_mut(&id) {
                m.owned.clear();
            }
        }
    }

    let mut st = lock(&shared);
    let State { topics, groups } = &mut *st;
    let Some(g) = groups.get_mut(&group) else { return };
    let mut by_topic: BTreeMap<Arc<str>, Vec<u64>> = BTreeMap::new();
    for (id, m) in &g.members {
        by_topic.entry(m.topic.clone()).or_default().push(*id);
    }
    for (topic, members) in by_topic {
        let logs = topics.get(&topic).map(|t| t.partitions.as_slice()).unwrap_or_default();
        let n = logs.len();
        let (per, extra) = (n / members.len(), n % members.len());
        let mut next = 0;
        for (i, id) in members.iter().enumerate() {
            let count = per + usize::from(i < extra);
            let Some(m) = g.members.get_mut(id) else { continue };
            let mut assignment = Vec::with_capacity(count);
            for (p, log) in logs.iter().enumerate().skip(next).take(count) {
                let tp = TopicPartition::new(topic.clone(), p as i32);
                let start = match (g.committed.get(&tp), m.reset) {
                    (Some(c), _) => *c,
                    (None, OffsetReset::Earliest) => 0,
                    (None, OffsetReset::Latest) => {
                        // Where the group starts is kept: a rebalance before its first commit (another
                        // member joining) must not skip what was published in between.
                        let end = log.len() as i64;
                        g.committed.insert(tp.clone(), end);
                        end
                    }
                };
                assignment.push((tp, start));
            }
            next += count;
            m.owned = assignment.iter().map(|(tp, _)| tp.clone()).collect();
            let _ = m.control.send(Control::Assign(assignment));
        }
    }
}

struct Cursor {
    position: i64,
    paused: bool,
}

/// One member of a group on the in-memory broker.
pub(crate) struct MemoryConsumer {
    shared: Arc<Shared>,
    group: String,
    member: u64,
    control: mpsc::UnboundedReceiver<Control>,
    cursors: BTreeMap<TopicPartition, Cursor>,
    /// It left the group by closing (else dropping it is a crash).
    left: bool,
}

impl MemoryConsumer {
    fn apply(&mut self, control: Control) -> LogEvent {
        match control {
            Control::Assign(list) => {
                let mut tps = Vec::with_capacity(list.len());
                for (tp, position) in list {
                    self.cursors.insert(
                        tp.clone(),
                        Cursor {
                            position,
                            paused: false,
                        },
                    );
                    tps.push(tp);
                }
                LogEvent::Assigned(tps)
            }
            Control::Revoke(partitions, tx) => {
                for tp in &partitions {
                    self.cursors.remove(tp);
                }
                LogEvent::Revoked {
                    partitions,
                    reply: Box::new(move |commits| {
                        let _ = tx.send(commits);
                    }),
                }
            }
        }
    }

    fn fetch(&mut self) -> Vec<Record> {
        let st = lock(&self.shared);
        let mut out = Vec::new();
        for (tp, cursor) in self.cursors.iter_mut().filter(|(_, c)| !c.paused) {
            let Some(log) = st
                .topics
                .get(&tp.topic)
                .and_then(|t| t.partitions.get(tp.partition as usize))
            else {
                continue;
            };
            let start = cursor.position.max(0) as usize;
            let end = log.len().min(start + FETCH_MAX);
            for (i, s) in log.iter().enumerate().take(end).skip(start) {
                out.push(Record {
                    tp: tp.clone(),
                    offset: i as i64,
                    key: s.key.clone(),
                    payload: s.payload.clone(),
                    headers: s.headers.clone(),
                    timestamp: Some(s.timestamp),
                    prior_attempts: 0,
                    attempts: 0,
                });
            }
            cursor.position = cursor.position.max(end as i64);
        }
        out
    }

    fn apply_commits(&self, commits: &Commits) -> Result<(), BrokerError> {
        let mut st = lock(&self.shared);
        let Some(g) = st.groups.get_mut(&self.group) else {
            return Err(BrokerError::Closed);
        };
        // Per partition, as Kafka answers: owned partitions are committed, the others refused.
        let owned = g.members.get(&self.member).map(|m| m.owned.clone()).unwrap_or_default();
        let mut refused = Vec::new();
        for (tp, o) in commits {
            if owned.contains(tp) {
                g.committed.insert(tp.clone(), *o);
            } else {
                refused.push((
                    tp.clone(),
                    "not assigned to this member: rebalance in progress".to_owned(),
                ));
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::PartialCommit { refused })
        }
    }
}

impl LogConsumer for MemoryConsumer {
    async fn next(&mut self) -> Option<LogEvent> {
        loop {
            match self.control.try_recv() {
                Ok(c) => return Some(self.apply(c)),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let shared = self.shared.clone();
            let notified = shared.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let records = self.fetch();
            if !records.is_empty() {
                return Some(LogEvent::Records(records));
            }
            let control = tokio::select! {
                c = self.control.recv() => Some(c),
                _ = notified => None,
            };
            if let Some(c) = control {
                return c.map(|c| self.apply(c));
            }
        }
    }

    fn pause(&mut self, tp: &TopicPartition) {
        if let Some(c) = self.cursors.get_mut(tp) {
            c.paused = true;
        }
    }

    fn resume(&mut self, tp: &TopicPartition) {
        if let Some(c) = self.cursors.get_mut(tp) {
            c.paused = false;
        }
        self.shared.data.notify_waiters();
    }

    fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>> {
        let r = self.apply_commits(&commits);
        Box::pin(std::future::ready(r))
    }

    async fn close(mut self, final_commits: Commits) -> Result<(), BrokerError> {
        let r = if final_commits.is_empty() {
            Ok(())
        } else {
            self.apply_commits(&final_commits)
        };
        self.left = true;
        leave(&self.shared, &self.group, self.member);
        r
    }
}

/// Removes a member from its group and rebalances the rest.
fn leave(shared: &Arc<Shared>, group: &str, member: u64) {
    {
        let mut st = lock(shared);
        if let Some(g) = st.groups.get_mut(group) {
            g.members.remove(&member);
        }
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(rebalance(shared.clone(), group.to_owned()));
    }
}

impl Drop for MemoryConsumer {
    /// A member that goes away without closing (its task aborted, as in a crash) stays in the group, its
    /// partitions unconsumed and their offsets as last committed, until its session times out, as on
    /// Kafka; then the group rebalances without it.
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let (shared, group, member) = (self.shared.clone(), self.group.clone(), self.member);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(shared.session_timeout).await;
                    tracing::debug!(group = %group, member, "member's session timed out; rebalancing without it");
                    leave(&shared, &group, member);
                });
            }
            Err(_) => leave(&shared, &group, member),
        }
    }
}

/// `memory://`, with options `?partitions=N` (the partition count of auto-created topics) and
/// `session.timeout.ms=MS` (how long a crashed member keeps its partitions).
pub(crate) fn open(url: &str, rest: &str) -> Result<Arc<dyn Backend>, ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidUrl {
        url: crate::redact::url(url),
        reason: reason.to_owned(),
    };
    let mut partitions = 1;
    let mut session_timeout = SESSION_TIMEOUT;
    if let Some(query) = rest.strip_prefix('?') {
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("partitions", n)) => {
                    partitions = n
                        .parse::<i32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("`partitions` must be a positive integer"))?;
                }
                Some(("session.timeout.ms", ms)) => {
                    session_timeout = ms
                        .parse::<u64>()
                        .map(Duration::from_millis)
                        .map_err(|_| invalid("`session.timeout.ms` must be a number of milliseconds"))?;
                }
                _ => {
                    return Err(invalid(
                        "the memory:// options are `partitions=N` and `session.timeout.ms=MS`",
                    ));
                }
            }
        }
    } else if !rest.is_empty() {
        return Err(invalid(
            "write `memory://` or `memory://?partitions=N&session.timeout.ms=MS`",
        ));
    }
    Ok(Arc::new(MemoryBroker::new(partitions, session_timeout)))
}

impl Publisher for MemoryBroker {
    fn send(&self, out: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        Box::pin(std::future::ready(self.append(out)))
    }
}

impl Backend for MemoryBroker {
    fn has_groups(&self) -> bool {
        true
    }

    fn check_topic(&self, topic: &str) -> Result<(), String> {
        check_topic_name(topic)
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<JoinHandle<()>, StartError>> {
        Box::pin(std::future::ready(self.start_now(launch)))
    }

    fn log_admin(&self) -> Option<&dyn LogAdmin> {
        Some(self)
    }
}

impl MemoryBroker {
    fn start_now(&self, launch: Launch) -> Result<JoinHandle<()>, StartError> {
        let cfg = &launch.rt.cfg;
        // Topics are created on first use here; `create_topic(n)` gives a new one its partitions.
        if let Some(n) = cfg.create_partitions
            && !self.lock().topics.contains_key(cfg.topic.as_str())
        {
            self.create_topic(&cfg.topic, n)?;
        }
        let consumer = self.join(cfg);
        Ok(spawn_log(launch, consumer))
    }
}

impl LogAdmin for MemoryBroker {
    fn create_topic<'a>(&'a self, topic: &'a str, partitions: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(std::future::ready(MemoryBroker::create_topic(self, topic, partitions)))
    }

    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>> {
        Box::pin(std::future::ready(Ok(MemoryBroker::committed(self, group, topic))))
    }

    fn end_offsets<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>> {
        Box::pin(std::future::ready(Ok(MemoryBroker::end_offsets(self, topic))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SubscriberConfig;

    #[tokio::test]
    async fn a_commit_is_applied_per_partition_and_refuses_only_what_the_member_does_not_own() {
        let broker = MemoryBroker::new(2, SESSION_TIMEOUT);
        broker.create_topic("t", 2).unwrap();
        let mut cfg = SubscriberConfig::new("t");
        cfg.group_id = Some("g".into());
        let mut member = broker.join(&cfg.resolve(true).unwrap());
        let Some(LogEvent::Assigned(owned)) = member.next().await else {
            panic!("the only member is assigned the topic");
        };
        assert_eq!(owned.len(), 2);
        // The group moves partition 1 elsewhere (a rebalance this member has not seen yet).
        lock(&broker.shared)
            .groups
            .get_mut("g")
            .unwrap()
            .members
            .get_mut(&member.member)
            .unwrap()
            .owned = vec![owned[0].clone()];
        let r = member.commit(vec![(owned[0].clone(), 5), (owned[1].clone(), 7)]).await;
        let Err(BrokerError::PartialCommit { refused }) = r else {
            panic!("a partly refused commit names what was refused: {r:?}");
        };
        assert_eq!(refused.iter().map(|(tp, _)| tp).collect::<Vec<_>>(), [&owned[1]]);
        assert_eq!(
            broker.committed("g", "t"),
            BTreeMap::from([(0, 5), (1, 0)]),
            "the owned partition is committed; the refused one keeps where the group started it"
        );
    }
}
