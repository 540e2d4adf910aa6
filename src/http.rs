//! The service's HTTP server (feature `http`), started by [`App::http`](crate::App::http) (the command
//! line's `run --http`): health probes, and with the features that add them, `/metrics` (`prometheus`)
//! and the docs page (`docs`).
//!
//! | path | answer |
//! |---|---|
//! | `/health/live` | `200` while the process serves HTTP |
//! | `/health/ready` | `200` once every subscriber is consuming; `503` while starting or stopping, when a subscriber has stopped for good, or when the broker has not answered for [`BROKER_DOWN_LIMIT`] |
//! | `/metrics` | the [Prometheus metrics](crate::prometheus) (feature `prometheus`) |
//! | `/docs`, `/asyncapi.json`, `/asyncapi.yaml` | the [docs page](crate::docs) (feature `docs`) |
//!
//! Both probes answer JSON saying why, for a person reading `kubectl describe`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::broker::Broker;

/// How long the broker may fail to answer before `/health/ready` says the service is not ready, unless
/// [`App::broker_down_limit`](crate::App::broker_down_limit) says otherwise.
pub const BROKER_DOWN_LIMIT: Duration = Duration::from_secs(30);

/// How long a readiness probe waits for the broker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes read: set by the app as it starts, runs and stops.
#[derive(Debug)]
pub(crate) struct Health {
    broker: Broker,
    started: AtomicBool,
    stopping: AtomicBool,
    subscribers: Mutex<Vec<(Arc<str>, tokio::task::AbortHandle)>>,
    /// The last time the broker answered, and the topic or queue to ask.
    broker_seen: Mutex<Instant>,
    probe: Mutex<Option<String>>,
    down_limit: Duration,
}

impl Health {
    pub(crate) fn new(broker: Broker, down_limit: Duration) -> Arc<Self> {
        Arc::new(Health {
            broker,
            started: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            broker_seen: Mutex::new(Instant::now()),
            probe: Mutex::new(None),
            down_limit,
        })
    }

    /// Every subscriber is consuming: ready, as long as their tasks run.
    pub(crate) fn started(&self, subscribers: Vec<(Arc<str>, tokio::task::AbortHandle)>, probe: Option<String>) {
        *lock(&self.subscribers) = subscribers;
        *lock(&self.probe) = probe;
        *lock(&self.broker_seen) = Instant::now();
        self.started.store(true, Ordering::SeqCst);
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    async fn readiness(&self) -> Result<serde_json::Value, String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("shutting down".to_owned());
        }
        if !self.started.load(Ordering::SeqCst) {
            return Err("starting: not every subscriber has its partitions yet".to_owned());
        }
        let stopped: Vec<String> = lock(&self.subscribers)
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(name, _)| name.to_string())
            .collect();
        if !stopped.is_empty() {
            return Err(format!("subscribers stopped for good: {}", stopped.join(", ")));
        }
        let probe = lock(&self.probe).clone();
        if let Some(topic) = probe {
            let answered = match tokio::time::timeout(PROBE_TIMEOUT, self.ask_broker(&topic)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "readiness: the broker did not answer");
                    false
                }
                Err(_) => false,
            };
            let mut seen = lock(&self.broker_seen);
            if answered {
                *seen = Instant::now();
            } else if seen.elapsed() > self.down_limit {
                return Err(format!(
                    "the broker has not answered for {:?} ({})",
                    seen.elapsed(),
                    self.broker.url()
                ));
            }
        }
        let names: Vec<String> = lock(&self.subscribers).iter().map(|(n, _)| n.to_string()).collect();
        Ok(json!({ "ready": true, "subscribers": names }))
    }

    async fn ask_broker(&self, topic: &str) -> Result<(), crate::AdminError> {
        match self.broker.end_offsets(topic).await {
            Err(crate::AdminError::Unsupported { .. }) => self.broker.queue_depth(topic).await.map(|_| ()),
            r => r.map(|_| ()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The routes of the service's HTTP server.
pub(crate) fn routes(health: Arc<Health>) -> axum::Router {
    let router = axum::Router::new()
        .route("/health/live", get(|| async { axum::Json(json!({ "live": true })) }))
        .route("/health/ready", get(ready));
    #[cfg(feature = "prometheus")]
    let router = router.route("/metrics", get(metrics));
    router.with_state(health)
}

async fn ready(State(health): State<Arc<Health>>) -> Response {
    match health.readiness().await {
        Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": why })),
        )
            .into_response(),
    }
}

#[cfg(feature = "prometheus")]
async fn metrics(State(health): State<Arc<Health>>) -> Response {
    let text = crate::prometheus::render(&health.broker).await;
    (
        [(axum::http::header::CONTENT_TYPE, crate::prometheus::CONTENT_TYPE)],
        text,
    )
        .into_response()
}
