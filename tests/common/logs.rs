//! A process-wide recorder of ferrostream's tracing events (DEBUG and above), for tests that check what
//! was logged. Installing it sets the global subscriber: a test binary that uses it runs those tests
//! alone in it.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Mutex, Once, OnceLock};

use tokio::sync::watch;
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// One recorded event: its level, message, and the `subscriber` and `offset` fields when present.
#[derive(Debug, Clone, Default)]
pub struct Logged {
    pub level: Option<Level>,
    pub message: String,
    pub subscriber: String,
    pub offset: Option<i64>,
}

static EVENTS: Mutex<Vec<Logged>> = Mutex::new(Vec::new());

/// Counts the recorded events, so a test can await one.
fn recorded() -> &'static watch::Sender<usize> {
    static RECORDED: OnceLock<watch::Sender<usize>> = OnceLock::new();
    RECORDED.get_or_init(|| watch::channel(0).0)
}

impl Visit for Logged {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "subscriber" => self.subscriber = format!("{value:?}"),
            _ => {}
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "subscriber" => self.subscriber = value.to_owned(),
            _ => {}
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "offset" {
            self.offset = Some(value);
        }
    }
}

struct Record;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("ferrostream") && *meta.level() <= Level::DEBUG {
            let mut logged = Logged {
                level: Some(*meta.level()),
                ..Logged::default()
            };
            event.record(&mut logged);
            EVENTS.lock().unwrap().push(logged);
            recorded().send_modify(|n| *n += 1);
        }
    }
}

/// Installs the recorder as the global subscriber (once), with ferrostream's INFO lines printed to the
/// test's output.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let debug = tracing_subscriber::filter::Targets::new().with_target("ferrostream", Level::DEBUG);
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry()
                .with(Record)
                .with(tracing_subscriber::Layer::with_filter(
                    tracing_subscriber::fmt::layer().with_test_writer(),
                    tracing_subscriber::filter::LevelFilter::INFO,
                ))
                .with(debug),
        )
        .unwrap();
    });
}

/// The recorded events at `level` or above.
pub fn at_least(level: Level) -> Vec<Logged> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.level.is_some_and(|l| l <= level))
        .cloned()
        .collect()
}

/// Waits until `done` holds for the events recorded so far, within `timeout`.
pub async fn wait_for(timeout: std::time::Duration, done: impl Fn(&[Logged]) -> bool) -> bool {
    let mut rx = recorded().subscribe();
    tokio::time::timeout(timeout, rx.wait_for(|_| done(&EVENTS.lock().unwrap())))
        .await
        .is_ok_and(|r| r.is_ok())
}
