//! The app lifecycle: start every subscriber, run until SIGINT/SIGTERM or a programmatic shutdown, then
//! stop fetching, drain in-flight handlers, commit and leave the groups ([guarantee 3.8](crate::guarantees)).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::error::{BrokerError, StartError};

/// An application: a broker and its subscribers.
///
/// ```no_run
/// #[tokio::main]
/// async fn main() -> Result<(), ferrostream::StartError> {
///     let broker = ferrostream::Broker::new("memory://")?;
///     broker.subscriber("in").handle(|body: String| async move { println!("{body}") });
///     ferrostream::App::new(broker).run().await // until Ctrl-C or SIGTERM
/// }
/// ```
pub struct App {
    broker: Broker,
    shutdown_timeout: Duration,
    ready_timeout: Duration,
}

impl App {
    /// An app over this broker's declared subscribers.
    pub fn new(broker: Broker) -> Self {
        App {
            broker,
            shutdown_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(60),
        }
    }

    /// How long shutdown waits for in-flight handlers before committing what is settled (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long `start` waits for every subscriber's first partition assignment (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Checks the settings of every subscriber declared on the broker since the last app started, starts
    /// them, and waits until each has joined its group and received its first assignment.
    pub async fn start(self) -> Result<RunningApp, StartError> {
        let subscribers = self.broker.take_subscribers()?;
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        let count = subscribers.len();
        for (mut cfg, spec) in subscribers {
            cfg.shutdown_timeout = self.shutdown_timeout;
            let name = cfg.name.clone();
            tracing::info!(subscriber = %name, topic = %cfg.topic, group = cfg.group_id.as_deref().unwrap_or("-"),
                policy = %cfg.policy, max_in_flight = cfg.max_in_flight, "starting subscriber");
            let retry_consumer = match &cfg.retry_topic {
                Some(topic) => Some(self.retry_consumer(&cfg, topic).await?),
                None => None,
            };
            let (task, r) = self.broker.start_subscriber(cfg, &spec, rx.clone()).await?;
            tasks.push(task);
            ready.push((name, r));
            if let Some(rc) = retry_consumer {
                let name = rc.name.clone();
                let (task, r) = self.broker.start_subscriber(rc, &spec, rx.clone()).await?;
                tasks.push(task);
                ready.push((name, r));
            }
        }
        let running = RunningApp {
            shutdown: Arc::new(tx),
            tasks,
            timeout: self.shutdown_timeout,
        };
        for (name, r) in ready {
            if tokio::time::timeout(self.ready_timeout, r)
                .await
                .map_or(true, |r| r.is_err())
            {
                running.shutdown_handle().shutdown();
                tracing::error!(subscriber = %name, "subscriber did not get its first assignment in time");
                return Err(StartError::Broker(BrokerError::Timeout {
                    op: "join group",
                    timeout: self.ready_timeout,
                }));
            }
        }
        tracing::info!(broker = %self.broker.url(), subscribers = count, "app started: every subscriber is consuming");
        Ok(running)
    }

    /// Non-blocking retries: creates the retry topic (as many partitions as the source) and configures the
    /// subscriber that consumes it.
    async fn retry_consumer(
        &self,
        cfg: &crate::config::ResolvedSubscriber,
        topic: &str,
    ) -> Result<crate::config::ResolvedSubscriber, StartError> {
        let partitions = self.broker.end_offsets(&cfg.topic).await.map_or(1, |m| m.len().max(1));
        self.broker.create_topic(topic, partitions as i32).await?;
        let mut rc = cfg.clone();
        rc.topic = topic.to_owned();
        rc.name = format!("{}.retry", cfg.name).into();
        rc.retry_consumer = true;
        rc.retry_topic = Some(topic.to_owned());
        // Retries published before this member joined must not be skipped.
        rc.auto_offset_reset = crate::OffsetReset::Earliest;
        Ok(rc)
    }

    /// Starts, runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run(self) -> Result<(), StartError> {
        let running = self.start().await?;
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        running.shutdown().await.map_err(StartError::Broker)
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Asks a running app to shut down. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Starts a graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A started app.
pub struct RunningApp {
    shutdown: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    timeout: Duration,
}

impl RunningApp {
    /// A handle that can stop the app from anywhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Waits until a [`ShutdownHandle`] asks for shutdown, then shuts down.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
        self.shutdown().await
    }

    /// Stops fetching, waits for in-flight handlers up to the shutdown timeout, commits, leaves the
    /// groups. Fails only if the subscribers did not stop within twice the timeout.
    pub async fn shutdown(self) -> Result<(), BrokerError> {
        self.shutdown.send_replace(true);
        let limit = self.timeout * 2 + Duration::from_secs(5);
        let all = futures::future::join_all(self.tasks);
        match tokio::time::timeout(limit, all).await {
            Ok(_) => Ok(()),
            Err(_) => Err(BrokerError::Timeout {
                op: "shutdown",
                timeout: limit,
            }),
        }
    }
}
