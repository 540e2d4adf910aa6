//! The side-by-side Kafka benchmark (issue 5): raw rdkafka loops, ferrostream's modes and FastStream, on the
//! same broker and the same pre-produced data, in one run.
//!
//! ```text
//! scripts/bench.sh                     # installs and starts nisshi and FastStream, then runs this
//! FERROSTREAM_BENCH_BROKER=kafka://127.0.0.1:9092 cargo bench --features kafka --bench kafka -- --rounds 3
//! ```
//!
//! Every contender runs in a child process of this binary (FastStream: a Python process), so CPU time and
//! peak RSS are its own and no client of one run lingers into the next. A consumer contender gets a fresh
//! group on a topic holding exactly the messages it must consume, from the earliest offset; its clock runs
//! from the first message handled to the last. After it exits, the group's committed offsets must equal the
//! topic's end offsets: a run that did not commit everything is reported as failed, not as fast. Contenders
//! are interleaved round by round: each row runs next to its baseline (in alternating order, the groups
//! rotating), and each ratio is taken within one round before the median over rounds is reported, because
//! this machine's absolute speed drifts between minutes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ferrostream::{AckPolicy, App, Batch, Broker, OffsetReset};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

const PAYLOAD: [u8; 100] = [b'x'; 100];
/// Distinct keys in the data: lets `max_in_flight(16)` run 16 messages of one partition at once.
const KEYS: usize = 64;
/// Publishes in flight at once in the pipelined publish contenders.
const PUBLISH_WINDOW: usize = 10_000;
/// A contender that takes longer than this is killed and its run counted as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Parser, Debug)]
struct Args {
    /// The broker, `kafka://host:port`.
    #[arg(long, env = "FERROSTREAM_BENCH_BROKER")]
    broker: String,
    /// Messages per high-throughput run (100 bytes each).
    #[arg(long, default_value_t = 2_000_000)]
    n: usize,
    /// Rounds: every contender runs once per round; medians are over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only contenders whose name contains one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Python interpreter with faststream[kafka] 0.7.8 installed.
    #[arg(long, env = "FERROSTREAM_BENCH_PYTHON", default_value = "python3")]
    python: String,
    /// Internal: run one contender in this process.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    topic: Option<String>,
    #[arg(long, hide = true)]
    group: Option<String>,
    #[arg(long, hide = true)]
    count: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What a contender measures about itself.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, schemars::JsonSchema)]
struct Report {
    /// Messages handled (or published), including any past the clock's end.
    n: usize,
    secs: f64,
    cpu_secs: f64,
    peak_rss_kb: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    RawAutoCommit,
    RawStoreOffset,
    FerroAckFirst,
    FerroAtLeastOnce,
    FerroBatch,
    /// At least once, a handler awaiting 1 ms, this many in flight per partition.
    FerroSlow(usize),
    /// `AckFirst`, a handler awaiting 1 ms, one in flight per partition.
    FerroSlowAckFirst,
    RawProduce,
    /// Raw rdkafka awaiting each delivery, at `linger.ms=0`: the fastest a lone record goes through
    /// librdkafka, the ceiling for an awaited publish.
    RawProduceAwaited,
    FerroPublishAwaited,
    FerroPublishPipelined,
    FerroPublishBatch,
    /// A FastStream mode of benches/faststream_bench.py.
    FastStream(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Data {
    /// A topic holding exactly the messages the contender consumes.
    Exact,
    /// The first `count` messages of a topic holding this many: a backlog far bigger than what is consumed.
    Backlog(usize),
    /// A fresh empty topic to publish into.
    Publish,
}

#[derive(Clone, Debug)]
struct Contender {
    name: String,
    runner: Runner,
    partitions: i32,
    count: usize,
    data: Data,
    /// The row this one is compared with.
    baseline: Option<String>,
}

fn contenders(n: usize) -> Vec<Contender> {
    let mut v = Vec::new();
    let mut add = |name: &str, runner, partitions, count, data, baseline: Option<&str>| {
        v.push(Contender {
            name: name.to_owned(),
            runner,
            partitions,
            count,
            data,
            baseline: baseline.map(str::to_owned),
        })
    };
    for p in [1, 4] {
        let auto = format!("raw auto-commit p{p}");
        let store = format!("raw store_offset p{p}");
        add(&auto, Runner::RawAutoCommit, p, n, Data::Exact, None);
        add(&store, Runner::RawStoreOffset, p, n, Data::Exact, None);
        add(
            &format!("ferrostream AckFirst p{p}"),
            Runner::FerroAckFirst,
            p,
            n,
            Data::Exact,
            Some(&auto),
        );
        add(
            &format!("ferrostream at-least-once p{p}"),
            Runner::FerroAtLeastOnce,
            p,
            n,
            Data::Exact,
            Some(&store),
        );
        add(
            &format!("ferrostream batch p{p}"),
            Runner::FerroBatch,
            p,
            n,
            Data::Exact,
            Some(&store),
        );
    }
    add(
        "ferrostream 1ms handler c1 p1",
        Runner::FerroSlow(1),
        1,
        3_000,
        Data::Exact,
        None,
    );
    add(
        "ferrostream 1ms handler c16 p1",
        Runner::FerroSlow(16),
        1,
        40_000,
        Data::Exact,
        Some("ferrostream 1ms handler c1 p1"),
    );
    add(
        "ferrostream 1ms handler c1 p1, backlog N/10",
        Runner::FerroSlow(1),
        1,
        3_000,
        Data::Backlog(n / 10),
        None,
    );
    add(
        "ferrostream 1ms handler c1 p1, backlog N",
        Runner::FerroSlow(1),
        1,
        3_000,
        Data::Backlog(n),
        Some("ferrostream 1ms handler c1 p1, backlog N/10"),
    );
    // AckFirst runs every partition at once, as the other policies do (issue 16): a 1 ms handler on 4
    // partitions against at-least-once on the same workload.
    add(
        "ferrostream at-least-once 1ms handler p4",
        Runner::FerroSlow(1),
        4,
        8_000,
        Data::Exact,
        None,
    );
    add(
        "ferrostream AckFirst 1ms handler p4",
        Runner::FerroSlowAckFirst,
        4,
        8_000,
        Data::Exact,
        Some("ferrostream at-least-once 1ms handler p4"),
    );
    add(
        "FastStream ACK_FIRST p1",
        Runner::FastStream("ack_first"),
        1,
        50_000,
        Data::Exact,
        Some("ferrostream AckFirst p1"),
    );
    add(
        "FastStream ACK p1",
        Runner::FastStream("ack"),
        1,
        10_000,
        Data::Exact,
        Some("ferrostream at-least-once p1"),
    );
    add(
        "FastStream MANUAL p1",
        Runner::FastStream("manual"),
        1,
        10_000,
        Data::Exact,
        Some("ferrostream at-least-once p1"),
    );
    add(
        "FastStream batch p1",
        Runner::FastStream("batch"),
        1,
        200_000,
        Data::Exact,
        Some("ferrostream batch p1"),
    );
    // The awaited rows first and side by side: a broker that has stored millions of records answers
    // more slowly, and these rows measure little else than the broker's answer.
    add(
        "raw produce awaited (linger 0)",
        Runner::RawProduceAwaited,
        4,
        5_000,
        Data::Publish,
        None,
    );
    add(
        "ferrostream publish awaited",
        Runner::FerroPublishAwaited,
        4,
        5_000,
        Data::Publish,
        Some("raw produce awaited (linger 0)"),
    );
    add(
        "FastStream publish awaited",
        Runner::FastStream("publish"),
        4,
        5_000,
        Data::Publish,
        Some("ferrostream publish awaited"),
    );
    add("raw produce pipelined", Runner::RawProduce, 4, n, Data::Publish, None);
    add(
        "ferrostream publish pipelined",
        Runner::FerroPublishPipelined,
        4,
        n,
        Data::Publish,
        Some("raw produce pipelined"),
    );
    add(
        "ferrostream publish_batch",
        Runner::FerroPublishBatch,
        4,
        n,
        Data::Publish,
        Some("raw produce pipelined"),
    );
    add(
        "FastStream publish_batch",
        Runner::FastStream("publish_batch"),
        4,
        200_000,
        Data::Publish,
        Some("ferrostream publish_batch"),
    );
    v
}

fn main() {
    let args = Args::parse();
    if let Some(child) = &args.child {
        run_child(&args, child);
        return;
    }
    let bootstrap = bootstrap_of(&args.broker);
    let mut all = contenders(args.n);
    if let Some(only) = &args.only {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        all.retain(|c| wanted.iter().any(|w| c.name.contains(w)));
    }
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let admin = Admin::new(&bootstrap);

    // One data topic per (partitions, count), produced once and read by every round.
    let mut data: HashMap<(i32, usize), String> = HashMap::new();
    for c in &all {
        let key = match c.data {
            Data::Exact => (c.partitions, c.count),
            Data::Backlog(size) => (c.partitions, size),
            Data::Publish => continue,
        };
        data.entry(key).or_insert_with(|| {
            let topic = format!("fsb{run_id}-p{}-n{}", key.0, key.1);
            eprintln!("producing {} messages into {topic} ({} partitions)", key.1, key.0);
            admin.create(&topic, key.0);
            produce(&bootstrap, &topic, key.1);
            topic
        });
    }

    let mut results: BTreeMap<String, Vec<Option<Report>>> = BTreeMap::new();
    for round in 0..args.rounds {
        // Each row runs next to its baseline, so a ratio compares runs seconds apart, not minutes: the
        // machine's speed drifts. The groups rotate, and every other round runs each group backwards
        // (baseline last), so neither side of a ratio always goes first.
        let mut groups = groups(&all);
        let shift = round % groups.len().max(1);
        groups.rotate_left(shift);
        if round % 2 == 1 {
            groups.iter_mut().for_each(|g| g.reverse());
        }
        for c in groups.iter().flatten() {
            let tag = slug(&c.name);
            let group = format!("fsb{run_id}-{tag}-r{round}");
            let topic = match c.data {
                Data::Exact => data[&(c.partitions, c.count)].clone(),
                Data::Backlog(size) => data[&(c.partitions, size)].clone(),
                Data::Publish => {
                    let t = format!("fsb{run_id}-pub-{tag}-r{round}");
                    admin.create(&t, c.partitions);
                    t
                }
            };
            eprint!("round {} / {}: {:<44} ", round + 1, args.rounds, c.name);
            let _ = std::io::stderr().flush();
            let report = run_contender(&args, &bootstrap, c, &topic, &group)
                .and_then(|r| admin.verify(c, &topic, &group, r).map(|()| r));
            match &report {
                Ok(r) => eprintln!("{:>12.0} msg/s", r.n.min(c.count) as f64 / r.secs),
                Err(e) => eprintln!("FAILED: {e}"),
            }
            if c.data == Data::Publish {
                admin.delete(&topic);
            }
            results.entry(c.name.clone()).or_default().push(report.ok());
        }
    }
    // The data too: a broker with memory storage (nisshi's) would otherwise keep every run's topics.
    for topic in data.values() {
        admin.delete(topic);
    }
    print_table(&args, &all, &results);
}

// ---- the orchestrator --------------------------------------------------------------------------------

fn bootstrap_of(url: &str) -> String {
    url.strip_prefix("kafka://")
        .unwrap_or(url)
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

fn run_contender(args: &Args, bootstrap: &str, c: &Contender, topic: &str, group: &str) -> Result<Report, String> {
    let count = c.count.to_string();
    let mut cmd = match c.runner {
        Runner::FastStream(mode) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/faststream_bench.py");
            let mut cmd = Command::new(&args.python);
            cmd.args([script, "--mode", mode, "--bootstrap", bootstrap]);
            cmd
        }
        _ => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut cmd = Command::new(exe);
            cmd.args(["--child", &c.name, "--broker", &args.broker]);
            cmd
        }
    };
    cmd.args(["--topic", topic, "--group", group, "--count", &count])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(out) => out.map_err(|e| e.to_string())?,
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            return Err(format!("timed out after {RUN_TIMEOUT:?}"));
        }
    };
    for l in String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("thread ") || l.starts_with("machine: "))
    {
        eprintln!("  {}: {l}", c.name);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match (out.status.success(), line) {
        (true, Some(line)) => serde_json::from_str(line).map_err(|e| format!("bad report {line:?}: {e}")),
        _ => Err(format!(
            "exit {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )),
    }
}

struct Admin {
    admin: AdminClient<DefaultClientContext>,
    bootstrap: String,
    rt: tokio::runtime::Runtime,
}

impl Admin {
    fn new(bootstrap: &str) -> Self {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Admin {
            admin,
            bootstrap: bootstrap.to_owned(),
            rt,
        }
    }

    fn broker(&self) -> Broker {
        Broker::new(&format!("kafka://{}", self.bootstrap)).expect("broker")
    }

    fn create(&self, topic: &str, partitions: i32) {
        let broker = self.broker();
        self.rt
            .block_on(broker.create_topic(topic, partitions))
            .expect("create topic");
    }

    fn delete(&self, topic: &str) {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = self.rt.block_on(self.admin.delete_topics(&[topic], &opts));
    }

    /// A run counts only if everything it consumed is committed (or everything it published is stored).
    fn verify(&self, c: &Contender, topic: &str, group: &str, r: Report) -> Result<(), String> {
        let broker = self.broker();
        let end: i64 = self
            .rt
            .block_on(broker.end_offsets(topic))
            .map_err(|e| e.to_string())?
            .values()
            .sum();
        if r.n < c.count {
            return Err(format!("handled {} of {}", r.n, c.count));
        }
        if c.data == Data::Publish {
            return if end == c.count as i64 {
                Ok(())
            } else {
                Err(format!("{end} records stored, {} published", c.count))
            };
        }
        let committed: i64 = self
            .rt
            .block_on(broker.committed_offsets(group, topic))
            .map_err(|e| e.to_string())?
            .values()
            .sum();
        let expected = match c.data {
            Data::Backlog(_) => r.n as i64,
            _ => end,
        };
        if committed == expected {
            Ok(())
        } else {
            Err(format!("committed {committed}, expected {expected}"))
        }
    }
}

/// Pre-produces `n` keyed 100-byte messages (not measured).
fn produce(bootstrap: &str, topic: &str, n: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for i in 0..n {
        let key = format!("k{}", i % KEYS);
        let mut record = BaseRecord::<str, [u8]>::to(topic).key(&key).payload(&PAYLOAD[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn rate(c: &Contender, r: &Report) -> f64 {
    r.n.min(c.count) as f64 / r.secs
}

/// The contenders in groups: a row without a baseline, then the rows compared with it, then the rows
/// compared with those (FastStream's rows are compared with ferrostream's).
fn groups(all: &[Contender]) -> Vec<Vec<Contender>> {
    let mut groups: Vec<Vec<Contender>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for c in all.iter().filter(|c| c.baseline.is_none()) {
        group_of.insert(c.name.clone(), groups.len());
        groups.push(vec![c.clone()]);
    }
    let mut rest: Vec<&Contender> = all.iter().filter(|c| c.baseline.is_some()).collect();
    while !rest.is_empty() {
        let before = rest.len();
        rest.retain(|c| {
            let Some(&g) = c.baseline.as_ref().and_then(|b| group_of.get(b)) else {
                return true;
            };
            group_of.insert(c.name.clone(), g);
            groups[g].push((*c).clone());
            false
        });
        if rest.len() == before {
            // A baseline that is not a contender: run those rows on their own.
            groups.extend(rest.drain(..).map(|c| vec![c.clone()]));
        }
    }
    groups
}

fn print_table(args: &Args, all: &[Contender], results: &BTreeMap<String, Vec<Option<Report>>>) {
    let by_name: HashMap<&str, &Contender> = all.iter().map(|c| (c.name.as_str(), c)).collect();
    // The ratio of a row to its baseline, taken round by round, then the median.
    let ratio = |name: &str| -> Option<f64> {
        let c = by_name.get(name)?;
        let base = by_name.get(c.baseline.as_deref()?)?;
        let mine = results.get(name)?;
        let theirs = results.get(&base.name)?;
        median(
            mine.iter()
                .zip(theirs)
                .filter_map(|(a, b)| Some(rate(c, a.as_ref()?) / rate(base, b.as_ref()?)))
                .collect(),
        )
    };
    let rss = |name: &str| -> Option<f64> {
        median(
            results
                .get(name)?
                .iter()
                .flatten()
                .map(|r| r.peak_rss_kb as f64)
                .collect(),
        )
    };
    let rss_ratio = |name: &str| -> Option<f64> {
        let base = by_name.get(name)?.baseline.as_deref()?;
        let (mine, theirs) = (rss(name)?, rss(base)?);
        Some(mine / theirs)
    };
    println!();
    println!(
        "N = {} messages of 100 bytes, {} rounds, medians; ratio = this row / its baseline, per round",
        args.n, args.rounds
    );
    println!();
    println!(
        "| {:<42} | {:>9} | {:>11} | {:>10} | {:>8} | {:>7} | {:<32} | {:>6} |",
        "contender", "messages", "msg/s", "CPU us/msg", "RSS MB", "ratio", "baseline", "failed"
    );
    println!(
        "|{:-<44}|{:->11}|{:->13}|{:->12}|{:->10}|{:->9}|{:-<34}|{:->8}|",
        "", "", "", "", "", "", "", ""
    );
    for c in all {
        let runs = results.get(&c.name).cloned().unwrap_or_default();
        let ok: Vec<Report> = runs.iter().flatten().copied().collect();
        let failed = runs.len() - ok.len();
        let rate_med = median(ok.iter().map(|r| rate(c, r)).collect());
        let cpu = median(ok.iter().map(|r| r.cpu_secs / r.n.min(c.count) as f64 * 1e6).collect());
        let rss = median(ok.iter().map(|r| r.peak_rss_kb as f64 / 1024.0).collect());
        let fmt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        println!(
            "| {:<42} | {:>9} | {:>11} | {:>10} | {:>8} | {:>7} | {:<32} | {:>6} |",
            c.name,
            c.count,
            fmt(rate_med, 0),
            fmt(cpu, 2),
            fmt(rss, 0),
            ratio(&c.name).map_or("-".to_owned(), |r| format!("{r:.3}x")),
            c.baseline.as_deref().unwrap_or(""),
            failed
        );
    }
    println!();
    println!("targets (issue 5):");
    let target = |label: &str, value: Option<f64>, pass: &dyn Fn(f64) -> bool| {
        let verdict = match value {
            Some(v) if pass(v) => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        println!(
            "  {label:<62} {:>10}  {verdict}",
            value.map_or("-".to_owned(), |v| format!("{v:.3}x"))
        );
    };
    for p in [1, 4] {
        let n = format!("ferrostream AckFirst p{p}");
        target(&format!("{n} / raw auto-commit >= 0.95"), ratio(&n), &|v| v >= 0.95);
        let n = format!("ferrostream at-least-once p{p}");
        target(&format!("{n} / raw store_offset >= 0.95"), ratio(&n), &|v| v >= 0.95);
    }
    let inverse = ratio("FastStream ACK p1").map(|r| 1.0 / r);
    target("ferrostream at-least-once p1 / FastStream ACK >= 400", inverse, &|v| {
        v >= 400.0
    });
    target(
        "1ms handler: max_in_flight(16) / concurrency 1 >= 10",
        ratio("ferrostream 1ms handler c16 p1"),
        &|v| v >= 10.0,
    );
    target(
        "publish pipelined / raw produce pipelined >= 0.95",
        ratio("ferrostream publish pipelined"),
        &|v| v >= 0.95,
    );
    target(
        "publish_batch / raw produce pipelined >= 0.95",
        ratio("ferrostream publish_batch"),
        &|v| v >= 0.95,
    );
    target(
        "publish awaited / FastStream publish awaited >= 1.5",
        ratio("FastStream publish awaited").map(|r| 1.0 / r),
        &|v| v >= 1.5,
    );
    // Flat: ten times the backlog, the same memory (librdkafka's prefetch and ours are both bounded).
    target(
        "peak RSS, 1ms handler: backlog N / backlog N/10 <= 1.1",
        rss_ratio("ferrostream 1ms handler c1 p1, backlog N"),
        &|v| v <= 1.1,
    );
}

// ---- the contenders ---------------------------------------------------------------------------------

fn run_child(args: &Args, name: &str) {
    let c = contenders(args.n)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no contender {name:?}"));
    let topic = args.topic.clone().expect("--topic");
    let group = args.group.clone().expect("--group");
    let count = args.count.expect("--count");
    let bootstrap = bootstrap_of(&args.broker);
    WINDOW.get_or_init(|| Window::new(count));
    let n = match c.runner {
        Runner::RawAutoCommit => raw_consume(&bootstrap, &topic, &group, count, false),
        Runner::RawStoreOffset => raw_consume(&bootstrap, &topic, &group, count, true),
        Runner::RawProduce => raw_produce(&bootstrap, &topic, count),
        Runner::RawProduceAwaited => raw_produce_awaited(&bootstrap, &topic, count),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(ferro(&args.broker, c.runner, &topic, &group, count)),
    };
    let w = WINDOW.get().expect("window");
    let (secs, cpu_secs) = w.measured().expect("the clock never stopped");
    let report = Report {
        n,
        secs,
        cpu_secs,
        peak_rss_kb: peak_rss_kb(),
    };
    if let (Some(s0), Some(s1)) = (SYSTEM_START.get(), SYSTEM_END.get()) {
        let per_msg = |secs: f64| secs / n.max(1) as f64 * 1e6;
        eprintln!(
            "machine: busy {:.3} us/msg (this process {:.3}, broker {:.3}, others {:.3}), idle {:.3} us/msg",
            per_msg(s1.0 - s0.0),
            per_msg(cpu_secs),
            per_msg(s1.2 - s0.2),
            per_msg(s1.0 - s0.0 - cpu_secs - (s1.2 - s0.2)),
            per_msg(s1.1 - s0.1)
        );
    }
    if let Some(rows) = THREADS.get() {
        for (name, secs) in rows {
            eprintln!(
                "thread {name:<24} {:>6.2} s {:>6.3} us/msg",
                secs,
                secs / n.max(1) as f64 * 1e6
            );
        }
    }
    println!("{}", serde_json::to_string(&report).expect("json"));
}

/// The clock of one contender: from the first message to the `count`-th.
struct Window {
    count: usize,
    seen: AtomicUsize,
    start: OnceLock<(Instant, f64)>,
    end: OnceLock<(Instant, f64)>,
    done: tokio::sync::Notify,
}

static WINDOW: OnceLock<Window> = OnceLock::new();

impl Window {
    fn new(count: usize) -> Self {
        Window {
            count,
            seen: AtomicUsize::new(0),
            start: OnceLock::new(),
            end: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        }
    }

    /// Counts `k` messages; returns true once `count` were seen.
    fn tick(&self, k: usize) -> bool {
        let before = self.seen.fetch_add(k, Ordering::Relaxed);
        if before == 0 {
            self.start.get_or_init(|| (Instant::now(), process_cpu_secs()));
            if std::env::var_os("FERROSTREAM_BENCH_THREADS").is_some() {
                SYSTEM_START.get_or_init(system_cpu);
            }
        }
        if before < self.count && before + k >= self.count {
            self.end.get_or_init(|| (Instant::now(), process_cpu_secs()));
            if std::env::var_os("FERROSTREAM_BENCH_THREADS").is_some() {
                SYSTEM_END.get_or_init(system_cpu);
                THREADS.get_or_init(thread_cpu);
            }
            self.done.notify_one();
        }
        before + k >= self.count
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    fn measured(&self) -> Option<(f64, f64)> {
        let (t0, c0) = self.start.get()?;
        let (t1, c1) = self.end.get()?;
        Some(((*t1 - *t0).as_secs_f64(), c1 - c0))
    }
}

fn tick(k: usize) -> bool {
    WINDOW.get().is_some_and(|w| w.tick(k))
}

/// User + system CPU time of this process (all threads, librdkafka's included).
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command; USER_HZ is 100.
    (ticks(11) + ticks(12)) / 100.0
}

/// Diagnostics (`FERROSTREAM_BENCH_THREADS=1`): the CPU time of each thread of this process from its start
/// to the clock's end, reported on stderr per message, to see which stage of a pipeline is the busy one.
static THREADS: OnceLock<Vec<(String, f64)>> = OnceLock::new();

fn thread_cpu() -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut rows: Vec<(String, f64)> = tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            Some((name, (ticks(11) + ticks(12)) / 100.0))
        })
        .collect();
    rows.retain(|r| r.1 > 0.0);
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

/// Diagnostics (`FERROSTREAM_BENCH_THREADS=1`): the machine's busy and idle CPU time (`/proc/stat`, all
/// cores) and the broker's, at the clock's start and end: what the contender costs the broker (its
/// fetches, its commits) counts too when both share the machine's cores.
static SYSTEM_START: OnceLock<(f64, f64, f64)> = OnceLock::new();
static SYSTEM_END: OnceLock<(f64, f64, f64)> = OnceLock::new();

/// The CPU seconds the broker process has used, when it runs on this machine as `nisshi`.
fn broker_cpu() -> f64 {
    static PID: OnceLock<Option<String>> = OnceLock::new();
    let pid = PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "nisshi").then(|| e.file_name().to_string_lossy().into_owned())
        })
    });
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// (busy, idle, broker) CPU seconds of the whole machine since boot, and of the broker.
fn system_cpu() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    let busy = ticks.iter().take(8).sum::<f64>() - idle;
    (busy / 100.0, idle / 100.0, broker_cpu())
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The librdkafka consumer settings ferrostream uses by default (src/kafka/mod.rs), so raw and framework
/// rows differ only by what the framework does.
fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.queue.backoff.ms", "10")
        .set("auto.offset.reset", "earliest");
    c
}

/// The trivial handler every throughput row runs: the payload read as text, in place (no copy). A
/// ferrostream handler that takes a `String` instead adds an allocation and a copy per message, as it
/// would in a raw loop (`cargo bench --bench framework` measures the framework with one).
fn as_text(payload: &[u8]) {
    std::hint::black_box(std::str::from_utf8(payload).unwrap_or_default());
}

/// Baselines: a `BaseConsumer` poll loop. `store`: at least once the librdkafka way (store each offset
/// after handling it, commit the stored offsets periodically); otherwise plain auto-commit.
fn raw_consume(bootstrap: &str, topic: &str, group: &str, count: usize, store: bool) -> usize {
    let consumer: BaseConsumer = consumer_config(bootstrap, group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", if store { "false" } else { "true" })
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut handled = 0;
    while handled < count {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                as_text(m.payload().unwrap_or_default());
                if store {
                    consumer.store_offset_from_message(&m).expect("store offset");
                }
                handled += 1;
                tick(1);
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync).expect("final commit");
    handled
}

/// A raw rdkafka producer with ferrostream's producer settings but `linger.ms`, and the runtime the
/// ferrostream publish rows run on, so only the publish path differs.
fn raw_producer(bootstrap: &str, linger_ms: &str) -> (FutureProducer, tokio::runtime::Runtime) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms)
        .create()
        .expect("producer");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (producer, rt)
}

fn raw_produce(bootstrap: &str, topic: &str, count: usize) -> usize {
    let (producer, rt) = raw_producer(bootstrap, "1");
    rt.block_on(async {
        let mut pending: FuturesUnordered<rdkafka::producer::DeliveryFuture> = FuturesUnordered::new();
        tick(0);
        for _ in 0..count {
            if pending.len() >= PUBLISH_WINDOW {
                pending
                    .next()
                    .await
                    .expect("pending")
                    .expect("delivery")
                    .expect("stored");
                tick(1);
            }
            let record = FutureRecord::<(), [u8]>::to(topic).payload(&PAYLOAD[..]);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
        }
        while let Some(r) = pending.next().await {
            r.expect("delivery").expect("stored");
            tick(1);
        }
    });
    count
}

fn raw_produce_awaited(bootstrap: &str, topic: &str, count: usize) -> usize {
    let (producer, rt) = raw_producer(bootstrap, "0");
    rt.block_on(async {
        tick(0);
        for _ in 0..count {
            let record = FutureRecord::<(), [u8]>::to(topic).payload(&PAYLOAD[..]);
            let delivery = producer.send_result(record).map_err(|(e, _)| e).expect("enqueue");
            delivery.await.expect("delivery").expect("stored");
            tick(1);
        }
    });
    count
}

async fn ferro(url: &str, runner: Runner, topic: &str, group: &str, count: usize) -> usize {
    let broker = Broker::new(url).expect("broker");
    let sub = || {
        broker
            .subscriber(topic)
            .name("bench")
            .group_id(group)
            .auto_offset_reset(OffsetReset::Earliest)
    };
    match runner {
        // The same trivial handler as the raw loops': the payload read as text, in place.
        Runner::FerroAckFirst => sub().ack_policy(AckPolicy::AckFirst).handle(|body: Bytes| async move {
            as_text(&body);
            tick(1);
        }),
        Runner::FerroAtLeastOnce => sub()
            .ack_policy(AckPolicy::NackOnError)
            .handle(|body: Bytes| async move {
                as_text(&body);
                tick(1);
            }),
        Runner::FerroBatch => sub()
            .ack_policy(AckPolicy::NackOnError)
            .batch(1000, Duration::from_millis(10))
            .handle(|Batch(bodies): Batch<Bytes>| async move {
                bodies.iter().for_each(|b| as_text(b));
                tick(bodies.len());
            }),
        Runner::FerroSlow(c) => {
            sub()
                .ack_policy(AckPolicy::NackOnError)
                .max_in_flight(c)
                .handle(|body: String| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    tick(body.len().min(1));
                })
        }
        Runner::FerroSlowAckFirst => sub().ack_policy(AckPolicy::AckFirst).handle(|body: String| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            tick(body.len().min(1));
        }),
        Runner::FerroPublishAwaited => {
            tick(0);
            for _ in 0..count {
                broker
                    .publish(Bytes::from_static(&PAYLOAD), topic)
                    .await
                    .expect("publish");
                tick(1);
            }
            return count;
        }
        Runner::FerroPublishPipelined => {
            tick(0);
            let mut pending = FuturesUnordered::new();
            for _ in 0..count {
                if pending.len() >= PUBLISH_WINDOW {
                    let r: Result<_, _> = pending.next().await.expect("pending");
                    r.expect("publish");
                    tick(1);
                }
                pending.push(std::future::IntoFuture::into_future(
                    broker.publish(Bytes::from_static(&PAYLOAD), topic),
                ));
            }
            while let Some(r) = pending.next().await {
                r.expect("publish");
                tick(1);
            }
            return count;
        }
        Runner::FerroPublishBatch => {
            tick(0);
            let mut sent = 0;
            while sent < count {
                let k = PUBLISH_WINDOW.min(count - sent);
                let acks = broker
                    .publish_batch((0..k).map(|_| broker.publish(Bytes::from_static(&PAYLOAD), topic)))
                    .await;
                assert!(acks.iter().all(Result::is_ok), "publish_batch failed");
                sent += k;
                tick(k);
            }
            return count;
        }
        _ => unreachable!("not a ferrostream consumer"),
    }
    let app = App::new(broker.clone()).start().await.expect("start");
    let w = WINDOW.get().expect("window");
    let notified = w.done.notified();
    if w.seen() < count {
        notified.await;
    }
    app.shutdown().await.expect("shutdown");
    if std::env::var_os("FERROSTREAM_BENCH_THREADS").is_some() {
        let m = broker.metrics().get("bench");
        eprintln!(
            "machine: this process made {} commits ({} failed)",
            m.commits, m.commit_errors
        );
    }
    w.seen()
}
