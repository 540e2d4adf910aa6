//! A group under churn, against a real Kafka-protocol broker: while a producer publishes at a steady
//! rate to 8 partitions, every 2 to 6 seconds a member of the group leaves gracefully (SIGTERM), crashes
//! (SIGKILL) or a new one joins, for a minute. Proves that nothing is lost and that the group never stands
//! still for long with work waiting: the longest stretch in which no member handled anything while
//! messages waited stays within the session timeout (what a crashed member holds its partitions for)
//! plus a few seconds, or, when crashes come less than a session apart (a join waits for every dead
//! member's session), within the chain of those crashes plus a session and a few seconds. Reports the figures BENCHMARKS.md keeps: seconds with progress, longest stall,
//! join times, duplicates per kill. Run once with the default (eager) assignors and once with
//! cooperative-sticky (`?consumer.partition.assignment.strategy=cooperative-sticky`).
//!
//! The members are the ignored test [`churn_member`], re-executed from this binary; each appends the index
//! of every message it handled to one shared file (one `O_APPEND` write per message, before the handler
//! returns), which the parent reads. Run: `export FERROSTREAM_TEST_BROKER=$(scripts/kafka-broker.sh start)`
//! then `cargo test --features kafka --test kafka_churn -- --nocapture` (`FERROSTREAM_CHURN_SEED=n`
//! replays a run's sequence of events).
#![cfg(feature = "kafka")]

mod common;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::future::IntoFuture;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrostream::{AckPolicy, App, Broker, Message, OffsetReset, State};

const PARTITIONS: i32 = 8;
/// Messages published per second, spread over the partitions by key.
const RATE: usize = 1_000;
/// How long members come and go.
const CHURN: Duration = Duration::from_secs(60);
const TOTAL: usize = RATE * CHURN.as_secs() as usize;
/// The members' handler waits this long per message.
const HANDLER_WAIT: Duration = Duration::from_millis(1);
/// The consumers' default `session.timeout.ms`: how long a crashed member holds its partitions.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the group may stand still with work waiting when crashes are a session apart: a crashed
/// member's session, and the rebalance that follows.
const STALL_BOUND: Duration = Duration::from_secs(15);
/// A join waits for every dead member of the group until its session expires: crashes less than a
/// session apart chain, and once the live members are all waiting in that join (eager: they revoked
/// everything; incremental: the replacements own nothing yet), the group may stand still from the first
/// crash of the chain until the last one's session ended, plus this for the rebalance.
const REBALANCE_SLACK: Duration = Duration::from_secs(5);
/// What one SIGKILL may replay: what the group can handle in a commit interval (100 ms) plus a commit's
/// round trip under load (another 100 ms), with every partition at its fastest (one message per
/// `HANDLER_WAIT`), as when members catch up a backlog: 8 x 1,000/s x 0.2 s.
const DUPLICATES_PER_KILL: usize = 1_600;
/// How long the members get to handle what is left once the churn and the producer stopped.
const DRAIN: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(20);

const MEMBER_TEST: &str = "churn_member";
const ENV_BROKER: &str = "FERROSTREAM_CHURN_BROKER";
const ENV_TOPIC: &str = "FERROSTREAM_CHURN_TOPIC";
const ENV_GROUP: &str = "FERROSTREAM_CHURN_GROUP";
const ENV_OUT: &str = "FERROSTREAM_CHURN_OUT";
const ENV_PARENT: &str = "FERROSTREAM_CHURN_PARENT";
/// What a member prints once `App::start` returned (it owns partitions).
const STARTED: &str = "churn member: started";

fn payload(i: usize) -> String {
    format!("m{i}")
}

#[derive(Clone)]
struct Out(Arc<File>);

async fn handle(msg: Message, State(out): State<Out>) -> std::io::Result<()> {
    tokio::time::sleep(HANDLER_WAIT).await;
    let index = std::str::from_utf8(msg.payload())
        .ok()
        .and_then(|p| p.strip_prefix('m'))
        .unwrap_or_default();
    (&*out.0).write_all(format!("{index}\n").as_bytes())
}

/// One member of the group: started by the churn test, it consumes until SIGKILL, or until SIGTERM, on
/// which it shuts down gracefully (drains, commits, leaves the group). Run by hand it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a member process of the kafka_churn tests, which start it themselves"]
async fn churn_member() {
    let Ok(url) = std::env::var(ENV_BROKER) else {
        eprintln!("{MEMBER_TEST}: not started by a churn test (no {ENV_BROKER}); nothing to do");
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("the parent sets {name}"));
    let parent: u32 = var(ENV_PARENT).parse().expect("the parent's pid");
    common::init_tracing();
    let file = OpenOptions::new()
        .append(true)
        .open(var(ENV_OUT))
        .expect("open the output file");
    let broker = Broker::new(&url)
        .expect("member broker")
        .with_state(Out(Arc::new(file)));
    broker
        .subscriber(&var(ENV_TOPIC))
        .group_id(var(ENV_GROUP))
        .auto_offset_reset(OffsetReset::Earliest)
        .ack_policy(AckPolicy::NackOnError)
        .handle(handle);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    let started = Instant::now();
    let app = App::new(broker).start().await.expect("the member starts");
    eprintln!("{STARTED} after {:?}", started.elapsed());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if std::os::unix::process::parent_id() != parent {
                    std::process::exit(3); // the parent test is gone
                }
            }
        }
    }
    app.shutdown().await.expect("a graceful shutdown");
    std::process::exit(0);
}

// ---- the parent ---------------------------------------------------------------------------------------

/// A member process. Dropping it kills it.
struct Member {
    label: String,
    child: Child,
    log: PathBuf,
    spawned: Instant,
    /// From its spawn to its "started" line.
    joined_in: Option<Duration>,
}

impl Member {
    fn spawn(label: String, url: &str, topic: &str, group: &str, out: &Path, dir: &Path) -> Self {
        let log = dir.join(format!("{label}.log"));
        let stdout = File::create(&log).expect("create the member's log");
        let stderr = stdout.try_clone().expect("clone the log handle");
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--ignored",
                "--exact",
                MEMBER_TEST,
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ENV_BROKER, url)
            .env(ENV_TOPIC, topic)
            .env(ENV_GROUP, group)
            .env(ENV_OUT, out)
            .env(ENV_PARENT, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn a member");
        Member {
            label,
            child,
            log,
            spawned: Instant::now(),
            joined_in: None,
        }
    }

    /// Notes when it joined; fails the test if it exited on its own.
    fn check(&mut self) {
        if let Some(status) = self.child.try_wait().expect("query the member") {
            panic!(
                "{} exited on its own ({status}):\n{}",
                self.label,
                common::log_tail(&self.log, 30)
            );
        }
        if self.joined_in.is_none() && std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(STARTED)) {
            self.joined_in = Some(self.spawned.elapsed());
        }
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} {}", self.label);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The members' output file, read as it grows: how often each message was handled.
struct Handled {
    file: File,
    partial: Vec<u8>,
    times: Vec<u32>,
    distinct: usize,
}

impl Handled {
    /// Reads what was appended; returns whether a message was handled for the first time.
    fn refresh(&mut self) -> bool {
        let before = self.distinct;
        self.file.read_to_end(&mut self.partial).expect("read the output file");
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return false;
        };
        let chunk: Vec<u8> = self.partial.drain(..=end).collect();
        for line in std::str::from_utf8(&chunk).expect("UTF-8").lines() {
            let i: usize = line.parse().unwrap_or_else(|_| panic!("malformed line {line:?}"));
            if self.times[i] == 0 {
                self.distinct += 1;
            }
            self.times[i] += 1;
        }
        self.distinct > before
    }
}

/// xorshift64*: the churn's sequence of events, replayable from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// How the group got through the churn.
#[derive(Debug, Default)]
struct Figures {
    terms: usize,
    kills: usize,
    /// When each SIGKILL was sent.
    kill_times: Vec<Instant>,
    joins: usize,
    longest_stall: Duration,
    seconds_with_progress: usize,
    seconds: usize,
    join_times: Vec<Duration>,
    leave_times: Vec<Duration>,
    duplicates: usize,
}

async fn churn(strategy: Option<&str>) -> Figures {
    let base = common::broker_url();
    assert!(
        base.starts_with("kafka://"),
        "kafka_churn needs a Kafka broker: FERROSTREAM_TEST_BROKER=$(scripts/kafka-broker.sh start), got {base:?}"
    );
    let url = match strategy {
        Some(s) => format!(
            "{base}{}consumer.partition.assignment.strategy={s}",
            if base.contains('?') { '&' } else { '?' }
        ),
        None => base.clone(),
    };
    let name = strategy.unwrap_or("eager");
    common::init_tracing();
    let broker = Broker::new(&base).expect("test broker");
    let topic = common::topic(&broker, "churn", PARTITIONS).await;
    let group = common::unique("churn-group");
    let dir = std::env::temp_dir().join(common::unique("ferrostream-churn"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let out = dir.join("handled");
    File::create(&out).expect("create the output file");
    let mut handled = Handled {
        file: File::open(&out).expect("open the output file"),
        partial: Vec::new(),
        times: vec![0; TOTAL],
        distinct: 0,
    };
    let seed = std::env::var("FERROSTREAM_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 0x9E37_79B9 + 1);
    let mut rng = Rng(seed);
    let mut next_label = 0;
    let spawn = |next_label: &mut usize| {
        *next_label += 1;
        Member::spawn(format!("member-{next_label}"), &url, &topic, &group, &out, &dir)
    };
    let mut members: Vec<Member> = (0..3).map(|_| spawn(&mut next_label)).collect();
    let mut leaving: Vec<(Member, Instant)> = Vec::new();
    let mut figures = Figures::default();

    // The producer: RATE messages a second, each keyed by its index.
    let published = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (broker, topic, published) = (broker.clone(), topic.clone(), published.clone());
        tokio::spawn(async move {
            let per_tick = RATE / 100;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for start in (0..TOTAL).step_by(per_tick) {
                tick.tick().await;
                let sends = (start..start + per_tick)
                    .map(|i| broker.publish(payload(i), &topic).key(format!("k{i}")).into_future());
                for ack in futures::future::join_all(sends).await {
                    ack.expect("publish");
                }
                published.store(start + per_tick, Ordering::Release);
            }
        })
    };

    let started = Instant::now();
    let mut last_progress = started;
    let mut progress_seconds = BTreeSet::new();
    let mut next_event = started + Duration::from_secs(2 + rng.below(5));
    let mut all_handled_at = None;
    while all_handled_at.is_none() {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        let waiting = published.load(Ordering::Acquire) > handled.distinct;
        if handled.refresh() || !waiting {
            last_progress = now;
            progress_seconds.insert((now - started).as_secs());
        } else {
            figures.longest_stall = figures.longest_stall.max(now - last_progress);
        }
        if handled.distinct == TOTAL {
            all_handled_at = Some(now);
        }
        for m in &mut members {
            m.check();
        }
        // Members leaving gracefully must be gone within their shutdown.
        leaving.retain_mut(|(m, since)| match m.child.try_wait().expect("query a leaving member") {
            Some(status) => {
                assert!(
                    status.success(),
                    "{} left with {status}:\n{}",
                    m.label,
                    common::log_tail(&m.log, 30)
                );
                figures.leave_times.push(since.elapsed());
                false
            }
            None => {
                assert!(
                    since.elapsed() < Duration::from_secs(45),
                    "{} did not leave:\n{}",
                    m.label,
                    common::log_tail(&m.log, 30)
                );
                true
            }
        });
        if now - started < CHURN && now >= next_event {
            next_event = now + Duration::from_secs(2 + rng.below(5));
            let action = if members.len() >= 4 { rng.below(2) } else { rng.below(3) };
            if action == 2 {
                figures.joins += 1;
                members.push(spawn(&mut next_label));
                continue;
            }
            let gone = members.remove(rng.below(members.len() as u64) as usize);
            if action == 0 {
                figures.terms += 1;
                gone.signal("-TERM");
                leaving.push((gone, now));
            } else {
                figures.kills += 1;
                figures.kill_times.push(now);
                drop(gone); // SIGKILL
            }
            if members.len() < 3 {
                figures.joins += 1;
                members.push(spawn(&mut next_label));
            }
        }
        assert!(
            now - started < CHURN + DRAIN,
            "[{name}] {} of {TOTAL} messages handled {:?} after the churn began (published {}):\n{}",
            handled.distinct,
            now - started,
            published.load(Ordering::Acquire),
            members
                .iter()
                .map(|m| format!("--- {}\n{}", m.label, common::log_tail(&m.log, 30)))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    producer.await.expect("the producer");
    let end = all_handled_at.expect("all handled") - started;
    figures.seconds = end.as_secs() as usize + 1;
    figures.seconds_with_progress = progress_seconds.len();
    figures.join_times = members
        .iter()
        .chain(leaving.iter().map(|(m, _)| m))
        .filter_map(|m| m.joined_in)
        .collect();
    figures.duplicates = handled.times.iter().map(|t| t.saturating_sub(1) as usize).sum();
    for m in &members {
        m.signal("-TERM");
    }
    for mut m in members {
        let status = m.child.wait().expect("wait for a member");
        assert!(
            status.success(),
            "{} did not shut down cleanly ({status}):\n{}",
            m.label,
            common::log_tail(&m.log, 30)
        );
    }
    figures.join_times.sort();
    println!(
        "churn [{name}] seed {seed}: {} SIGTERM, {} SIGKILL, {} joins over {CHURN:?} at {RATE} msg/s on {PARTITIONS} \
         partitions; everything handled after {end:.1?}; progress in {} of {} s; longest stall with work waiting \
         {:.1?}; joins (spawn to started) median {:.1?}, max {:.1?}; graceful leaves max {:.1?}; {} duplicates",
        figures.terms,
        figures.kills,
        figures.joins,
        figures.seconds_with_progress,
        figures.seconds,
        figures.longest_stall,
        figures
            .join_times
            .get(figures.join_times.len() / 2)
            .copied()
            .unwrap_or_default(),
        figures.join_times.last().copied().unwrap_or_default(),
        figures.leave_times.iter().max().copied().unwrap_or_default(),
        figures.duplicates,
    );
    let _ = std::fs::remove_dir_all(&dir);
    figures
}

impl Figures {
    /// The longest chain of kills each less than a session after the previous, from its first kill until
    /// its last kill's session ended, plus a rebalance; never below [`STALL_BOUND`].
    fn stall_bound(&self) -> Duration {
        let mut longest = Duration::ZERO;
        let mut chain_start = None;
        for (i, t) in self.kill_times.iter().enumerate() {
            let start = match (chain_start, i.checked_sub(1).map(|p| self.kill_times[p])) {
                (Some(s), Some(previous)) if *t - previous < SESSION_TIMEOUT => s,
                _ => *t,
            };
            chain_start = Some(start);
            longest = longest.max(*t - start);
        }
        STALL_BOUND.max(longest + SESSION_TIMEOUT + REBALANCE_SLACK)
    }
}

fn check(f: &Figures, stall_bound: Duration) {
    assert!(
        f.longest_stall <= stall_bound,
        "the group stood still for {:?} with work waiting (bound {stall_bound:?}, for a {SESSION_TIMEOUT:?} \
         session): {f:?}",
        f.longest_stall
    );
    assert!(
        f.duplicates <= f.kills * DUPLICATES_PER_KILL,
        "{} duplicates for {} kills: graceful leaves and joins replay nothing, a kill at most its commit window: {f:?}",
        f.duplicates,
        f.kills
    );
}

/// One run after the other: members of both runs side by side would share the two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churning_group_loses_nothing_and_never_stalls_past_a_session() {
    let eager = churn(None).await;
    let cooperative = churn(Some("cooperative-sticky")).await;
    check(&eager, eager.stall_bound());
    check(&cooperative, cooperative.stall_bound());
}
