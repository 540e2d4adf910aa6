//! The side-by-side RabbitMQ benchmark: two raw lapin consumer loops with manual acks (one that sends its
//! acks from a task of their own, the baseline of the target; one that awaits each ack's write before the
//! next message), ferrostream's at-least-once and `AckFirst` subscribers and FastStream 0.7.8's
//! `RabbitBroker`, on the same broker and the same pre-published data, in one run.
//!
//! ```text
//! scripts/bench.sh                     # the whole suite; this one after the Kafka stage
//! cargo bench --features amqp --bench amqp -- --n 200000 --rounds 3
//! FERROSTREAM_BENCH_AMQP=amqp://user:pass@host:5672/%2f cargo bench --features amqp --bench amqp
//! ```
//!
//! Every contender runs in a child process (this binary re-executed, or a Python process for FastStream:
//! `benches/faststream_rabbit_bench.py`), so CPU time and peak RSS are its own and no connection of one run
//! lingers into the next. Before each run the orchestrator declares a fresh durable classic queue and fills
//! it with exactly `--n` persistent 100-byte messages (publisher confirms, not timed). The contender consumes
//! with the same prefetch (`basic.qos`) and acks each message after its handler; its clock runs from the
//! first message handled to the last. After it exits, the queue must hold nothing (no message ready, none
//! left unacked, no consumer) and the child must report exactly `--n` handled, or the run counts as failed.
//! Rounds interleave the contenders (every round runs all, each row next to its baseline, the order
//! reversed every other round); each ratio is taken within one round before the median over rounds is
//! reported, because this machine's absolute speed drifts between minutes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ferrostream::amqp::Queue;
use ferrostream::{AckPolicy, App, Broker};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PAYLOAD: [u8; 100] = [b'x'; 100];
/// Unconfirmed publishes in flight while filling a queue.
const FILL_WINDOW: usize = 5_000;
/// A contender that takes longer than this is killed and its run counted as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// The row whose ratio to the raw loop the issue sets a target for.
const TARGET_ROW: &str = "ferrostream at-least-once";
const TARGET: f64 = 0.9;
/// The baseline of the target: a hand-written loop whose acks never hold up handling.
const RAW_PIPELINED: &str = "raw lapin manual-ack, pipelined";

#[derive(Parser, Debug)]
struct Args {
    /// The broker, `amqp://user:password@host:port/vhost`.
    #[arg(long, env = "FERROSTREAM_BENCH_AMQP", default_value = DEFAULT_URL)]
    url: String,
    /// Messages per run (100 bytes each).
    #[arg(long, default_value_t = 200_000)]
    n: usize,
    /// Rounds: every contender runs once per round; medians are over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The prefetch (`basic.qos`) every contender consumes with.
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// Only contenders whose name contains one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Python interpreter with faststream[rabbit] 0.7.8 installed.
    #[arg(long, env = "FERROSTREAM_BENCH_PYTHON", default_value = "python3")]
    python: String,
    /// Internal: run one contender in this process.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    queue: Option<String>,
    #[arg(long, hide = true)]
    count: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What a contender measures about itself (the same fields the Python side prints).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, schemars::JsonSchema)]
struct Report {
    /// Messages handled, including any past the clock's end (a redelivery would show here).
    n: usize,
    secs: f64,
    cpu_secs: f64,
    peak_rss_kb: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    RawManualAck,
    RawPipelinedAck,
    FerroAtLeastOnce,
    FerroAckFirst,
    FastStream,
}

#[derive(Clone, Debug)]
struct Contender {
    name: &'static str,
    runner: Runner,
    /// The row this one is compared with.
    baseline: Option<&'static str>,
    /// The ratio is printed as baseline / this row (ferrostream / FastStream) instead of this / baseline.
    inverse: bool,
}

fn contenders() -> Vec<Contender> {
    let c = |name, runner, baseline, inverse| Contender {
        name,
        runner,
        baseline,
        inverse,
    };
    vec![
        c(RAW_PIPELINED, Runner::RawPipelinedAck, None, false),
        // The loop that awaits each ack's write before the next message: how much that wait costs.
        c("raw lapin manual-ack", Runner::RawManualAck, Some(RAW_PIPELINED), false),
        c(TARGET_ROW, Runner::FerroAtLeastOnce, Some(RAW_PIPELINED), false),
        c(
            "ferrostream AckFirst",
            Runner::FerroAckFirst,
            Some(RAW_PIPELINED),
            false,
        ),
        c(
            "FastStream 0.7.8 RabbitBroker",
            Runner::FastStream,
            Some(TARGET_ROW),
            true,
        ),
    ]
}

fn main() {
    let args = Args::parse();
    if let Some(child) = &args.child {
        run_child(&args, child);
        return;
    }
    let mut all = contenders();
    if let Some(only) = &args.only {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        all.retain(|c| wanted.iter().any(|w| c.name.contains(w)));
    }
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let admin = Admin::new(&args.url);
    eprintln!(
        "RabbitMQ at {}; {} messages per run, prefetch {}",
        redact(&args.url),
        args.n,
        args.prefetch
    );

    let mut results: BTreeMap<&str, Vec<Option<Report>>> = BTreeMap::new();
    for round in 0..args.rounds {
        // Each row runs next to its baseline; every other round runs them backwards, so neither side of a
        // ratio always goes first.
        let mut order = all.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for c in &order {
            let queue = format!("fsb-amqp{run_id}-{}-r{round}", slug(c.name));
            eprint!("round {} / {}: {:<32} ", round + 1, args.rounds, c.name);
            let _ = std::io::stderr().flush();
            let report = admin
                .fill(&queue, args.n)
                .and_then(|()| run_contender(&args, c, &queue))
                .and_then(|r| admin.verify(&queue, args.n, r).map(|()| r));
            match &report {
                Ok(r) => eprintln!("{:>10.0} msg/s", args.n as f64 / r.secs),
                Err(e) => eprintln!("FAILED: {e}"),
            }
            admin.delete(&queue);
            results.entry(c.name).or_default().push(report.ok());
        }
    }
    print_table(&args, &all, &results);
}

// ---- the orchestrator --------------------------------------------------------------------------------

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

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

fn run_contender(args: &Args, c: &Contender, queue: &str) -> Result<Report, String> {
    let count = args.n.to_string();
    let prefetch = args.prefetch.to_string();
    let mut cmd = match c.runner {
        Runner::FastStream => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/faststream_rabbit_bench.py");
            let mut cmd = Command::new(&args.python);
            cmd.args([script, "--url", &args.url]);
            cmd
        }
        _ => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut cmd = Command::new(exe);
            cmd.args(["--child", c.name, "--url", &args.url]);
            cmd
        }
    };
    cmd.args(["--queue", queue, "--count", &count, "--prefetch", &prefetch])
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

/// The orchestrator's own connection: declares, fills, checks and deletes the queues.
struct Admin {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    channel: Channel,
}

impl Admin {
    fn new(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (conn, channel) = rt.block_on(async {
            let conn = Connection::connect(url, ConnectionProperties::default())
                .await
                .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {}: {e}", redact(url)));
            let channel = conn.create_channel().await.expect("channel");
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            (conn, channel)
        });
        Admin { rt, conn, channel }
    }

    /// Declares a fresh durable classic queue (what ferrostream declares by default) and fills it with
    /// exactly `n` persistent messages, pipelined with publisher confirms.
    fn fill(&self, queue: &str, n: usize) -> Result<(), String> {
        let ch = &self.channel;
        self.rt.block_on(async {
            let opts = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(queue.into(), opts, FieldTable::default())
                .await
                .map_err(|e| format!("declare: {e}"))?;
            let props = BasicProperties::default().with_delivery_mode(2);
            let mut pending = FuturesUnordered::new();
            let confirmed = |c: Result<Confirmation, lapin::Error>| match c {
                Ok(Confirmation::Ack(None)) => Ok(()),
                other => Err(format!("fill: publish not confirmed: {other:?}")),
            };
            for _ in 0..n {
                if pending.len() >= FILL_WINDOW {
                    confirmed(pending.next().await.expect("pending"))?;
                }
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &PAYLOAD,
                        props.clone(),
                    )
                    .await
                    .map_err(|e| format!("fill: {e}"))?;
                pending.push(confirm);
            }
            while let Some(c) = pending.next().await {
                confirmed(c)?;
            }
            let depth = self.depth(queue).await?.0;
            if depth == n as u64 {
                Ok(())
            } else {
                Err(format!("filled {n} messages, the queue holds {depth}"))
            }
        })
    }

    /// (messages ready, consumers) of the queue, by a passive declare.
    async fn depth(&self, queue: &str) -> Result<(u64, u64), String> {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .channel
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .map_err(|e| format!("passive declare: {e}"))?;
        Ok((u64::from(q.message_count()), u64::from(q.consumer_count())))
    }

    /// A run counts only if the child handled exactly `n` and the queue is empty once its consumer is gone.
    /// A message left unacked goes back to the queue when the child's channel closes, so it shows as ready:
    /// wait for the consumer to be gone, then check twice, a moment apart.
    fn verify(&self, queue: &str, n: usize, r: Report) -> Result<(), String> {
        self.rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, consumers) = self.depth(queue).await?;
                if consumers == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{consumers} consumers still on the queue after the child exited"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let (ready, consumers) = self.depth(queue).await?;
                if ready != 0 || consumers != 0 {
                    return Err(format!(
                        "{ready} messages left in the queue ({consumers} consumers); handled {}",
                        r.n
                    ));
                }
            }
            if r.n != n {
                return Err(format!("handled {} of {n}", r.n));
            }
            Ok(())
        })
    }

    fn delete(&self, queue: &str) {
        let _ = self
            .rt
            .block_on(self.channel.queue_delete(queue.into(), QueueDeleteOptions::default()));
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.conn.close(200, "done".into()));
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn print_table(args: &Args, all: &[Contender], results: &BTreeMap<&str, Vec<Option<Report>>>) {
    let n = args.n as f64;
    let by_name: BTreeMap<&str, &Contender> = all.iter().map(|c| (c.name, c)).collect();
    // The ratio of a row to its baseline (or the inverse), taken round by round, then the median.
    let ratio = |name: &str| -> Option<f64> {
        let c = by_name.get(name)?;
        let mine = results.get(name)?;
        let theirs = results.get(c.baseline?)?;
        median(
            mine.iter()
                .zip(theirs)
                .filter_map(|(a, b)| {
                    let r = b.as_ref()?.secs / a.as_ref()?.secs;
                    Some(if c.inverse { 1.0 / r } else { r })
                })
                .collect(),
        )
    };
    println!();
    println!(
        "RabbitMQ at {}: N = {} messages of 100 bytes (persistent, durable classic queue), prefetch {}, {} rounds, \
         medians; ratio = this row / its baseline, per round",
        redact(&args.url),
        args.n,
        args.prefetch,
        args.rounds
    );
    println!();
    println!(
        "| {:<32} | {:>9} | {:>10} | {:>10} | {:>7} | {:>7} | {:<40} | {:>6} |",
        "contender", "messages", "msg/s", "CPU us/msg", "RSS MB", "ratio", "baseline", "failed"
    );
    println!(
        "|{:-<34}|{:->11}|{:->12}|{:->12}|{:->9}|{:->9}|{:-<42}|{:->8}|",
        "", "", "", "", "", "", "", ""
    );
    for c in all {
        let runs = results.get(c.name).cloned().unwrap_or_default();
        let ok: Vec<Report> = runs.iter().flatten().copied().collect();
        let failed = runs.len() - ok.len();
        let rate = median(ok.iter().map(|r| n / r.secs).collect());
        let cpu = median(ok.iter().map(|r| r.cpu_secs / n * 1e6).collect());
        let rss = median(ok.iter().map(|r| r.peak_rss_kb as f64 / 1024.0).collect());
        let fmt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        let baseline = match (c.baseline, c.inverse) {
            (Some(b), true) => format!("{b}, inverse"),
            (Some(b), false) => b.to_owned(),
            (None, _) => String::new(),
        };
        println!(
            "| {:<32} | {:>9} | {:>10} | {:>10} | {:>7} | {:>7} | {:<40} | {:>6} |",
            c.name,
            args.n,
            fmt(rate, 0),
            fmt(cpu, 2),
            fmt(rss, 0),
            ratio(c.name).map_or("-".to_owned(), |r| format!("{r:.3}x")),
            baseline,
            failed
        );
    }
    if all.iter().any(|c| c.inverse) {
        println!("(inverse: the ratio is the baseline / this row, e.g. ferrostream / FastStream)");
    }
    println!();
    println!("msg/s per round:");
    for c in all {
        let rounds: Vec<String> = results
            .get(c.name)
            .map(|v| {
                v.iter()
                    .map(|r| r.map_or("FAILED".to_owned(), |r| format!("{:.0}", n / r.secs)))
                    .collect()
            })
            .unwrap_or_default();
        println!("  {:<32} {}", c.name, rounds.join("  "));
    }
    println!();
    let value = ratio(TARGET_ROW);
    let verdict = match value {
        Some(v) if v >= TARGET => "met",
        Some(_) => "MISSED",
        None => "not measured",
    };
    println!(
        "target: {TARGET_ROW} / {RAW_PIPELINED} >= {TARGET}   {}  {verdict}",
        value.map_or("-".to_owned(), |v| format!("{v:.3}x"))
    );
}

// ---- the contenders ---------------------------------------------------------------------------------

fn run_child(args: &Args, name: &str) {
    let c = contenders()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no contender {name:?}"));
    let queue = args.queue.clone().expect("--queue");
    let count = args.count.expect("--count");
    WINDOW.get_or_init(|| Window::new(count));
    // The same runtime for every Rust contender, so only the consumer differs.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let n = match c.runner {
        Runner::RawManualAck => rt.block_on(raw_consume(&args.url, &queue, count, args.prefetch, false)),
        Runner::RawPipelinedAck => rt.block_on(raw_consume(&args.url, &queue, count, args.prefetch, true)),
        Runner::FerroAtLeastOnce | Runner::FerroAckFirst => {
            rt.block_on(ferro(&args.url, c.runner, &queue, count, args.prefetch))
        }
        Runner::FastStream => unreachable!("FastStream runs in Python"),
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

    /// Counts one message.
    fn tick(&self) {
        let before = self.seen.fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            self.start.get_or_init(|| (Instant::now(), process_cpu_secs()));
            if diagnostics() {
                SYSTEM_START.get_or_init(system_cpu);
            }
        }
        if before + 1 == self.count {
            self.end.get_or_init(|| (Instant::now(), process_cpu_secs()));
            if diagnostics() {
                SYSTEM_END.get_or_init(system_cpu);
                THREADS.get_or_init(thread_cpu);
            }
            self.done.notify_one();
        }
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

fn tick() {
    if let Some(w) = WINDOW.get() {
        w.tick();
    }
}

/// `FERROSTREAM_BENCH_THREADS=1`: per-thread and machine CPU diagnostics on stderr.
fn diagnostics() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERROSTREAM_BENCH_THREADS").is_some())
}

/// utime + stime, in seconds, from a `/proc/.../stat` line (USER_HZ is 100).
fn stat_cpu_secs(stat: &str) -> f64 {
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// User + system CPU time of this process (all threads, lapin's I/O thread included).
fn process_cpu_secs() -> f64 {
    stat_cpu_secs(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// Diagnostics: the CPU time of each thread of this process from its start to the clock's end.
static THREADS: OnceLock<Vec<(String, f64)>> = OnceLock::new();

fn thread_cpu() -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut rows: Vec<(String, f64)> = tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let name = stat.split_once('(')?.1.rsplit_once(')')?.0.to_owned();
            Some((name, stat_cpu_secs(&stat)))
        })
        .collect();
    rows.retain(|r| r.1 > 0.0);
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

/// Diagnostics: (busy, idle, broker) CPU seconds of the whole machine and of the RabbitMQ server
/// (`beam.smp`, when it runs on this machine), at the clock's start and end.
static SYSTEM_START: OnceLock<(f64, f64, f64)> = OnceLock::new();
static SYSTEM_END: OnceLock<(f64, f64, f64)> = OnceLock::new();

fn broker_cpu() -> f64 {
    static PID: OnceLock<Option<String>> = OnceLock::new();
    let pid = PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then(|| e.file_name().to_string_lossy().into_owned())
        })
    });
    pid.as_ref().map_or(0.0, |pid| {
        stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
    })
}

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

/// The trivial handler every row runs: the payload read as text, in place (no copy).
fn as_text(payload: &[u8]) {
    std::hint::black_box(std::str::from_utf8(payload).unwrap_or_default());
}

/// The hand-written lapin loop: `basic.qos(prefetch)`, `basic.consume`, and per delivery the payload read
/// as text, then `basic.ack` of that one delivery tag (not `multiple`). With `pipelined`, the acks go to a
/// task of their own, which sends what is waiting together (each frame queued in order, one wait for the
/// socket), so handling never waits for an ack's write: what a careful hand-written consumer does, and
/// what ferrostream does. Without it, each ack's write is awaited before the next message.
async fn raw_consume(url: &str, queue: &str, count: usize, prefetch: u16, pipelined: bool) -> usize {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "raw-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let acker = pipelined.then(|| {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut tags = Vec::new();
            while let Some(tag) = rx.recv().await {
                tags.push(tag);
                while let Ok(t) = rx.try_recv() {
                    tags.push(t);
                }
                let acks = tags.drain(..).map(|t| channel.basic_ack(t, BasicAckOptions::default()));
                for r in futures::future::join_all(acks).await {
                    r.expect("basic.ack");
                }
            }
        })
    });
    let mut handled = 0;
    while handled < count {
        match consumer.next().await {
            Some(Ok(d)) => {
                as_text(&d.data);
                if pipelined {
                    tx.send(d.delivery_tag).expect("acker runs");
                } else {
                    channel
                        .basic_ack(d.delivery_tag, BasicAckOptions::default())
                        .await
                        .expect("basic.ack");
                }
                handled += 1;
                tick();
            }
            Some(Err(e)) => panic!("consumer failed: {e}"),
            None => panic!("the broker cancelled the consumer"),
        }
    }
    drop(tx);
    if let Some(acker) = acker {
        acker.await.expect("acker");
    }
    let _ = channel
        .basic_cancel("raw-bench".into(), BasicCancelOptions::default())
        .await;
    channel.close(200, "done".into()).await.expect("close channel");
    conn.close(200, "done".into()).await.expect("close connection");
    handled
}

/// ferrostream's subscriber with the same prefetch and one handler at a time (`max_in_flight(1)`).
async fn ferro(url: &str, runner: Runner, queue: &str, count: usize, prefetch: u16) -> usize {
    let broker = Broker::new(url).expect("broker");
    let policy = match runner {
        Runner::FerroAckFirst => AckPolicy::AckFirst,
        _ => AckPolicy::NackOnError,
    };
    broker
        .subscriber(queue)
        .name("bench")
        .queue(Queue::durable().prefetch(prefetch))
        .ack_policy(policy)
        .max_in_flight(1)
        // The same trivial handler as the raw loop's: the payload read as text, in place.
        .handle(|body: Bytes| async move {
            as_text(&body);
            tick();
        });
    let app = App::new(broker.clone()).start().await.expect("start");
    let w = WINDOW.get().expect("window");
    let notified = w.done.notified();
    if w.seen() < count {
        notified.await;
    }
    app.shutdown().await.expect("shutdown");
    w.seen()
}
