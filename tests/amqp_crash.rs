//! Crash safety on RabbitMQ (SPEC 3.9's promise, on a queue): a consuming process under at-least-once
//! (`NackOnError`) is killed with SIGKILL at random points, at least ten times over 50 000 messages, and
//! restarted each time. Every message is handled successfully at least once (0 lost), and the messages
//! handled twice are counted and reported: each kill can replay at most what the broker had delivered and
//! not yet seen acked, which the prefetch bounds.
//!
//! How: the consumer is the ignored test [`crash_child_consumer`], which the parent re-executes from its
//! own binary. The child appends `payload\n` to a file inside the handler, in one `O_APPEND` write, before
//! returning `Ok`: a line means "handled successfully", and it survives the kill (it is in the kernel).
//! The parent watches the file (another process: polling the file is the synchronisation) and kills the
//! child after a random number of new lines. Run: `cargo test --features amqp --test amqp_crash --
//! --nocapture` (`FERROSTREAM_TEST_AMQP` names the server; default the local one).
#![cfg(feature = "amqp")]

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrostream::amqp::Queue;
use ferrostream::{AckPolicy, App, Broker, State};

const MESSAGES: usize = 50_000;
const KILLS: usize = 12;
const PREFETCH: u16 = 64;
const CHILD_TEST: &str = "crash_child_consumer";
const ENV_QUEUE: &str = "FERROSTREAM_CRASH_QUEUE";
const ENV_OUT: &str = "FERROSTREAM_CRASH_OUT";
/// Upper limit of one consumer life.
const LIFE_DEADLINE: Duration = Duration::from_secs(60);

fn url() -> String {
    std::env::var("FERROSTREAM_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The handled-lines file, shared by the child's handler calls.
#[derive(Clone)]
struct Out(Arc<Mutex<std::fs::File>>);

/// The consumer process: runs until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started by the crash test, in a child process"]
async fn crash_child_consumer() {
    let (Ok(queue), Ok(out)) = (std::env::var(ENV_QUEUE), std::env::var(ENV_OUT)) else {
        eprintln!("{CHILD_TEST}: not started by a crash test; nothing to do");
        return;
    };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&out)
        .expect("output file");
    let broker = Broker::new(&url())
        .expect("url")
        .with_state(Out(Arc::new(Mutex::new(file))));
    broker
        .subscriber(&queue)
        .queue(Queue::durable().prefetch(PREFETCH))
        .ack_policy(AckPolicy::NackOnError)
        .handle(|body: String, State(out): State<Out>| async move {
            // One write per line: it is in the kernel before the handler returns (and before the ack).
            let line = format!("{body}\n");
            out.0.lock().unwrap().write_all(line.as_bytes())
        });
    let _app = App::new(broker).start().await.expect("child starts");
    eprintln!("{CHILD_TEST}: consuming");
    std::future::pending::<()>().await;
}

fn spawn_child(queue: &str, out: &PathBuf) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--ignored", "--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
        .env(ENV_QUEUE, queue)
        .env(ENV_OUT, out)
        .env("FERROSTREAM_TEST_AMQP", url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts")
}

fn lines(out: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A small deterministic generator, seeded from the clock (the seed is printed, to replay a run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_on_error_loses_nothing_across_kill_9() {
    common::init_tracing();
    let broker = Broker::new(&url()).expect("url");
    let queue = common::unique("crash");
    broker.create_topic(&queue, 1).await.expect("queue declared");
    for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(1000) {
        let acks = broker
            .publish_batch(chunk.iter().map(|i| broker.publish(format!("m{i}"), &queue)))
            .await;
        assert!(acks.iter().all(Result::is_ok), "every publish confirmed");
    }
    let dir = std::env::temp_dir().join(common::unique("amqp-crash"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("handled.txt");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    println!("seed {seed}");

    let mut kills = 0;
    let mut replays = Vec::new();
    while kills < KILLS {
        let before = lines(&out);
        let distinct_before: std::collections::HashSet<&String> = before.iter().collect();
        // Kill after 500..=4500 new lines: a random point of the stream.
        let target = before.len() + 500 + rng.next(4001) as usize;
        let mut child = spawn_child(&queue, &out);
        let started = Instant::now();
        loop {
            let n = lines(&out).len();
            if n >= target || started.elapsed() > LIFE_DEADLINE {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the consumer exited by itself: {status}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
        let after = lines(&out);
        let replayed = after[before.len()..]
            .iter()
            .filter(|l| distinct_before.contains(l))
            .count();
        replays.push(replayed);
        let distinct: std::collections::HashSet<&String> = after.iter().collect();
        println!(
            "kill {kills}: {} lines, {} distinct, {replayed} handled again in this life",
            after.len(),
            distinct.len()
        );
        if distinct.len() == MESSAGES {
            break; // the stream ended before the planned kills: a shorter run still counts its kills
        }
    }
    assert!(kills >= 10, "only {kills} kills before the stream ended");

    // A last life handles what is left; then it is stopped for good.
    let mut child = spawn_child(&queue, &out);
    let started = Instant::now();
    loop {
        let distinct: std::collections::HashSet<String> = lines(&out).into_iter().collect();
        if distinct.len() == MESSAGES {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {MESSAGES} handled",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let all = lines(&out);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in &all {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    let lost: Vec<usize> = (0..MESSAGES)
        .filter(|i| !counts.contains_key(format!("m{i}").as_str()))
        .collect();
    let unknown = counts
        .keys()
        .filter(|k| {
            k.strip_prefix('m')
                .and_then(|n| n.parse::<usize>().ok())
                .is_none_or(|n| n >= MESSAGES)
        })
        .count();
    let duplicates = all.len() - counts.len();
    println!(
        "{MESSAGES} messages, {kills} kills: {} lost, {duplicates} duplicates ({:.1} per kill; replays per life {replays:?})",
        lost.len(),
        duplicates as f64 / kills as f64
    );
    assert!(
        lost.is_empty(),
        "lost {} messages, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(unknown, 0, "only published messages were handled");
    // A kill replays what was delivered and not yet acked: at most the prefetch (plus the last life's own
    // replay, which is a kill too).
    let bound = (kills + 1) * usize::from(PREFETCH);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates over {kills} kills, more than the prefetch allows ({bound})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
