//! Lifecycle hooks (`on_startup`, `after_startup`, `on_shutdown`, `after_shutdown`) and `App::run`'s
//! signal handling: a second signal exits at once, and the shutdown's deadline ends a process whose
//! handler blocks its thread. The signal tests run the app in a child process (this test binary
//! re-executed) and send it real signals.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrostream::{App, Broker, StartError, State};

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Greeting(&'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_around_the_subscribers() {
    let broker = common::broker();
    let topic = common::topic(&broker, "hooks", 1).await;
    let log = Log::default();
    let observer = broker.observer();
    let l = log.clone();
    // The handler needs state that only the on_startup hook registers: the start checks it after the hook.
    common::member(&broker, &topic, "sub", &common::unique("g"))
        .auto_commit(false)
        .handle(move |body: String, State(g): State<Greeting>| {
            let l = l.clone();
            async move { l.push(format!("handled {body} with {}", g.0)) }
        });
    let (l1, l2, l3, l4) = (log.clone(), log.clone(), log.clone(), log.clone());
    let t = topic.clone();
    let app = App::new(broker.clone())
        .on_startup(move |broker: Broker| async move {
            let _ = broker.with_state(Greeting("hello"));
            l1.push("on_startup");
            Ok::<_, std::io::Error>(())
        })
        .after_startup(move |broker: Broker| async move {
            l2.push("after_startup");
            broker.publish("first", &t).await.map(|_| ())
        })
        .on_shutdown(move |_| async move {
            l3.push("on_shutdown");
            Ok::<_, std::io::Error>(())
        })
        .after_shutdown(move |_| async move {
            l4.push("after_shutdown");
            Ok::<_, std::io::Error>(())
        })
        .start()
        .await
        .expect("starts");
    observer.wait_settled("sub", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        log.all(),
        [
            "on_startup",
            "after_startup",
            "handled first with hello",
            "on_shutdown",
            "after_shutdown"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_startup_hook_stops_the_start_with_its_error() {
    let broker = common::broker();
    let topic = common::topic(&broker, "hooks", 1).await;
    common::member(&broker, &topic, "sub", &common::unique("g")).handle(|_: String| async {});
    let err = App::new(broker.clone())
        .on_startup(|_| async { Err(std::io::Error::other("the database is not reachable")) })
        .start()
        .await
        .err()
        .expect("the hook fails");
    assert!(
        matches!(
            err,
            StartError::Hook {
                stage: "on_startup",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("the database is not reachable"), "{err}");

    let broker = common::broker();
    common::member(&broker, &topic, "sub", &common::unique("g")).handle(|_: String| async {});
    let log = Log::default();
    let l = log.clone();
    let err = App::new(broker.clone())
        .after_startup(|_| async { Err("cannot warm the cache") })
        .after_shutdown(move |_| async move {
            l.push("stopped");
            Ok::<_, std::io::Error>(())
        })
        .start()
        .await
        .err()
        .expect("the hook fails");
    assert!(
        matches!(
            err,
            StartError::Hook {
                stage: "after_startup",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        log.all(),
        ["stopped"],
        "the subscribers it had started were stopped again"
    );
}

const CHILD: &str = "signal_child";
const MODE: &str = "FERROSTREAM_SIGNAL_CHILD";

/// The app `App::run` runs in the child: a handler that waits (mode `waits`: an await that outlasts the
/// shutdown timeout) or blocks its thread (mode `blocks`), and a message for it published at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started by the signal tests, in a child process"]
async fn signal_child() {
    let Ok(mode) = std::env::var(MODE) else { return };
    let broker = Broker::new("memory://").unwrap();
    let blocks = mode == "blocks";
    broker.subscriber("work").handle(move |_: String| async move {
        println!("handling");
        if blocks {
            std::thread::sleep(Duration::from_secs(600));
        } else {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
    });
    let app = App::new(broker).shutdown_timeout(Duration::from_secs(if blocks { 1 } else { 60 }));
    let app = app.after_startup(|broker| async move { broker.publish("job", "work").await.map(|_| ()) });
    // Mode `starting`: a start that does not finish (a hook waiting, like a broker that hangs).
    let app = if mode == "starting" {
        app.on_startup(|_| async {
            println!("starting");
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, std::io::Error>(())
        })
    } else {
        app
    };
    match app.run().await {
        Err(ferrostream::StartError::Interrupted) => std::process::exit(3),
        other => other.unwrap(),
    }
}

/// Starts the child app and returns it once its handler is running.
fn child(mode: &str) -> std::process::Child {
    child_at(mode, "handling")
}

/// Starts the child app and returns it once it printed `marker`.
fn child_at(mode: &str, marker: &str) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", CHILD, "--nocapture", "--test-threads", "1"])
        .env(MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains(marker))),
        "the child printed {marker:?}"
    );
    child
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), started.elapsed());
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("the child did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_signal_during_shutdown_exits_at_once() {
    let mut c = child("waits");
    signal(&c, "-TERM");
    // The graceful shutdown waits for the handler (up to 60 s); a second signal ends it now.
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.try_wait().unwrap().is_none(), "still draining after the first signal");
    signal(&c, "-INT");
    let (code, took) = wait_exit(&mut c, Duration::from_secs(5));
    assert_eq!(code, Some(130), "exited in {took:?}");
}

#[test]
fn a_handler_blocking_its_thread_cannot_hold_the_process_past_the_shutdown_deadline() {
    let mut c = child("blocks");
    let sent = Instant::now();
    signal(&c, "-TERM");
    // shutdown_timeout 1 s: the deadline is 2 x 1 s + 5 s, then the process exits with code 1.
    let (code, _) = wait_exit(&mut c, Duration::from_secs(20));
    let took = sent.elapsed();
    assert_eq!(code, Some(1));
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

#[test]
fn a_signal_during_start_stops_the_app_at_once() {
    let mut c = child_at("starting", "starting");
    signal(&c, "-INT");
    let (code, took) = wait_exit(&mut c, Duration::from_secs(5));
    assert_eq!(code, Some(3), "App::run returned StartError::Interrupted (in {took:?})");
}
