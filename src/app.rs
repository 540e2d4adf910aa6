//! The app lifecycle: start every subscriber, run until SIGINT/SIGTERM or a programmatic shutdown, then
//! stop fetching, drain in-flight handlers, commit and leave the groups ([guarantee 3.8](crate::guarantees)).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::error::{BoxError, BrokerError, ConfigError, StartError};

/// A lifecycle hook: given the broker, it may fail.
type Hook = Box<dyn FnOnce(Broker) -> BoxFuture<'static, Result<(), BoxError>> + Send>;

fn hook<F, Fut, E>(f: F) -> Hook
where
    F: FnOnce(Broker) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::new(move |broker| Box::pin(async move { f(broker).await.map_err(Into::into) }))
}

/// Runs hooks in the order they were added; the first failure stops them.
async fn run_hooks(hooks: Vec<Hook>, broker: &Broker, stage: &'static str) -> Result<(), StartError> {
    for h in hooks {
        h(broker.clone())
            .await
            .map_err(|source| StartError::Hook { stage, source })?;
    }
    Ok(())
}

/// Shutdown hooks: a failure is logged and the rest still run (the app is stopping anyway).
async fn run_shutdown_hooks(hooks: Vec<Hook>, broker: &Broker, stage: &'static str) {
    for h in hooks {
        if let Err(e) = h(broker.clone()).await {
            tracing::error!(stage, error = %e, "shutdown hook failed");
        }
    }
}

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
    info: crate::asyncapi::Info,
    /// Where the service's HTTP server listens, and whether its docs page may publish.
    #[cfg(feature = "http")]
    http: Option<(String, bool)>,
    #[cfg(feature = "http")]
    broker_down_limit: Duration,
    shutdown_timeout: Duration,
    ready_timeout: Duration,
    on_startup: Vec<Hook>,
    after_startup: Vec<Hook>,
    on_shutdown: Vec<Hook>,
    after_shutdown: Vec<Hook>,
}

impl App {
    /// An app over this broker's declared subscribers.
    pub fn new(broker: Broker) -> Self {
        App {
            broker,
            info: crate::asyncapi::Info::default(),
            #[cfg(feature = "http")]
            http: None,
            #[cfg(feature = "http")]
            broker_down_limit: crate::http::BROKER_DOWN_LIMIT,
            shutdown_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(60),
            on_startup: Vec::new(),
            after_startup: Vec::new(),
            on_shutdown: Vec::new(),
            after_shutdown: Vec::new(),
        }
    }

    /// The service's title in its AsyncAPI document and docs page (default: the executable's name).
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.info.title = title.into();
        self
    }

    /// The service's version in its AsyncAPI document (default `0.1.0`; e.g.
    /// `env!("CARGO_PKG_VERSION")`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.info.version = version.into();
        self
    }

    /// What the service does, for its AsyncAPI document and docs page.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.info.description = Some(text.into());
        self
    }

    /// Serves the service's HTTP routes on `addr` (e.g. `0.0.0.0:8000`; port 0 picks a free one, see
    /// [`RunningApp::http_addr`]) from the start until the shutdown: `/health/live`, `/health/ready`, and
    /// with their features `/metrics` and the docs page. See [`http`](crate::http). The address is
    /// bound before any subscriber starts: a taken port fails the start at once
    /// ([`StartError::Http`]).
    #[cfg(feature = "http")]
    pub fn http(mut self, addr: impl Into<String>) -> Self {
        let allow = self.http.as_ref().is_some_and(|(_, a)| *a);
        self.http = Some((addr.into(), allow));
        self
    }

    /// How long the broker may fail to answer `/health/ready`'s probe before the service says it is not
    /// ready (default [`BROKER_DOWN_LIMIT`](crate::http::BROKER_DOWN_LIMIT), 30 s).
    #[cfg(feature = "http")]
    pub fn broker_down_limit(mut self, limit: Duration) -> Self {
        self.broker_down_limit = limit;
        self
    }

    /// Lets the docs page served by [`http`](Self::http) publish test messages (off by default: never on
    /// a page production users can reach).
    #[cfg(feature = "docs")]
    pub fn allow_docs_publish(mut self, allow: bool) -> Self {
        if let Some((_, a)) = &mut self.http {
            *a = allow;
        }
        self
    }

    /// The service's AsyncAPI 3.0 document: every subscriber declared on the broker and its routers (and
    /// started by an app), every declared publisher. Fails like [`start`](Self::start) would on a
    /// subscriber declared wrong. See [`asyncapi`](crate::asyncapi).
    pub fn asyncapi(&self) -> Result<crate::asyncapi::Document, ConfigError> {
        Ok(crate::asyncapi::generate(&self.info, &self.broker.declarations()?))
    }

    #[cfg(feature = "cli")]
    pub(crate) fn info(&self) -> &crate::asyncapi::Info {
        &self.info
    }

    /// The broker this app runs.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Runs before any subscriber connects: it may register state (`broker.with_state(..)`) or declare
    /// subscribers. A failure stops the start with [`StartError::Hook`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use ferrostream::{App, Broker, State};
    /// #[derive(Clone)]
    /// struct Db(&'static str);
    /// let broker = Broker::new("memory://")?;
    /// broker.subscriber("orders").handle(|_: String, State(db): State<Db>| async move { let _ = db.0; });
    /// let app = App::new(broker)
    ///     .on_startup(|broker| async move {
    ///         let _ = broker.with_state(Db("postgres://..."));
    ///         Ok::<_, std::io::Error>(())
    ///     })
    ///     .after_startup(|broker| async move { broker.publish("hello", "orders").await.map(|_| ()) })
    ///     .start()
    ///     .await?;
    /// app.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub fn on_startup<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce(Broker) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.on_startup.push(hook(f));
        self
    }

    /// Runs once every subscriber is consuming: it may publish. A failure stops the app again and fails
    /// the start with [`StartError::Hook`].
    pub fn after_startup<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce(Broker) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.after_startup.push(hook(f));
        self
    }

    /// Runs when shutdown begins, before the subscribers stop (they still consume and may handle what it
    /// publishes). A failure is logged; shutdown goes on.
    pub fn on_shutdown<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce(Broker) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.on_shutdown.push(hook(f));
        self
    }

    /// Runs after every subscriber has stopped and committed. A failure is logged.
    pub fn after_shutdown<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce(Broker) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.after_shutdown.push(hook(f));
        self
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
    pub async fn start(mut self) -> Result<RunningApp, StartError> {
        run_hooks(std::mem::take(&mut self.on_startup), &self.broker, "on_startup").await?;
        #[cfg(feature = "http")]
        let http = self.serve_http().await?;
        let subscribers = self.broker.take_subscribers()?;
        #[cfg(feature = "http")]
        let probe = subscribers.first().map(|(cfg, _)| cfg.topic.clone());
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        let count = subscribers.len();
        for (mut cfg, spec) in subscribers {
            cfg.shutdown_timeout = self.shutdown_timeout;
            let name = cfg.name.clone();
            tracing::info!(subscriber = %name, topic = %cfg.topic, group = %cfg.group_id.as_deref().unwrap_or("-"),
                policy = %cfg.policy, max_in_flight = cfg.max_in_flight,
                group_instance_id = cfg.group_instance_id.as_deref(), "starting subscriber");
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
        #[cfg(feature = "http")]
        let watched: Vec<(Arc<str>, tokio::task::AbortHandle)> = ready
            .iter()
            .map(|(name, _)| name.clone())
            .zip(tasks.iter().map(|t| t.abort_handle()))
            .collect();
        let running = RunningApp {
            shutdown: Arc::new(tx),
            #[cfg(feature = "http")]
            http,
            tasks,
            timeout: self.shutdown_timeout,
            broker: self.broker.clone(),
            on_shutdown: std::mem::take(&mut self.on_shutdown),
            after_shutdown: std::mem::take(&mut self.after_shutdown),
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
        #[cfg(feature = "http")]
        if let Some(server) = &running.http {
            server.health.started(watched, probe);
        }
        if let Err(e) = run_hooks(std::mem::take(&mut self.after_startup), &self.broker, "after_startup").await {
            if let Err(stop) = running.shutdown().await {
                tracing::error!(error = %stop, "stopping after a failed after_startup hook");
            }
            return Err(e);
        }
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

    /// Starts, runs until SIGINT or SIGTERM, then shuts down gracefully. A second signal during the
    /// shutdown exits the process at once (exit code 130); so does the shutdown's deadline (twice the
    /// shutdown timeout plus 5 s, exit code 1) when a handler blocks its thread and never returns.
    pub async fn run(self) -> Result<(), StartError> {
        // A signal during the start (a broker that hangs, a hook that waits) stops it: Ctrl-C works at
        // every moment, not only once the app is consuming.
        let mut signals = Signals::new();
        let running = tokio::select! {
            started = self.start() => started?,
            _ = signals.recv() => {
                tracing::warn!("shutdown signal during start: stopping what was started");
                return Err(StartError::Interrupted);
            }
        };
        signals.recv().await;
        let limit = running.limit();
        tracing::info!(deadline = ?limit, "shutdown signal received; a second one exits at once");
        tokio::spawn(async move {
            signals.recv().await;
            tracing::warn!("second shutdown signal: exiting now, without waiting for handlers");
            std::process::exit(130);
        });
        // A thread of its own: a handler blocking the runtime's threads cannot hold it up.
        let done = Arc::new(AtomicBool::new(false));
        let watched = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(limit + Duration::from_secs(1));
            if !watched.load(Ordering::SeqCst) {
                tracing::error!(deadline = ?limit, "shutdown did not finish by its deadline (a handler blocks its thread?); exiting");
                std::process::exit(1);
            }
        });
        let r = running.shutdown().await;
        done.store(true, Ordering::SeqCst);
        if let Err(e) = r {
            // Handlers still hold their threads: the runtime could not even be dropped. Leave now.
            tracing::error!(error = %e, "shutdown did not finish by its deadline (a handler blocks its thread?); exiting");
            std::process::exit(1);
        }
        Ok(())
    }
}

/// SIGINT and SIGTERM, listened to from the moment this is made (a signal that arrives before the first
/// `recv` is kept, never left to the default action that kills the process).
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                int: signal(SignalKind::interrupt()).ok(),
                term: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.int.is_none() && self.term.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                _ = next(&mut self.int) => {}
                _ = next(&mut self.term) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
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
    #[cfg(feature = "http")]
    http: Option<HttpServer>,
    tasks: Vec<JoinHandle<()>>,
    timeout: Duration,
    broker: Broker,
    on_shutdown: Vec<Hook>,
    after_shutdown: Vec<Hook>,
}

impl RunningApp {
    /// A handle that can stop the app from anywhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Where the service's HTTP server listens ([`App::http`]).
    #[cfg(feature = "http")]
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(|s| s.addr)
    }

    /// Waits until a [`ShutdownHandle`] asks for shutdown, then shuts down.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
        self.shutdown().await
    }

    /// Stops fetching, waits for in-flight handlers up to the shutdown timeout, commits, leaves the
    /// groups. Fails only if the subscribers did not stop within twice the timeout.
    pub async fn shutdown(mut self) -> Result<(), BrokerError> {
        #[cfg(feature = "http")]
        if let Some(server) = &self.http {
            server.health.stopping();
        }
        run_shutdown_hooks(std::mem::take(&mut self.on_shutdown), &self.broker, "on_shutdown").await;
        self.shutdown.send_replace(true);
        let limit = self.limit();
        let all = futures::future::join_all(std::mem::take(&mut self.tasks));
        let r = match tokio::time::timeout(limit, all).await {
            Ok(_) => Ok(()),
            Err(_) => Err(BrokerError::Timeout {
                op: "shutdown",
                timeout: limit,
            }),
        };
        run_shutdown_hooks(std::mem::take(&mut self.after_shutdown), &self.broker, "after_shutdown").await;
        #[cfg(feature = "http")]
        if let Some(server) = self.http.take() {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
        r
    }

    /// Stops every subscriber at once, as a crash would: nothing drains, nothing is committed, no
    /// shutdown hook runs. For tests of what a crash leaves behind: on `memory://` the group keeps the
    /// dead member's partitions until its session times out, then hands them on from their last
    /// committed offsets. (On Kafka the client still leaves its group as it is dropped: kill the process
    /// to test a crash there.)
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = ferrostream::Broker::new("memory://?session.timeout.ms=200")?;
    /// broker.subscriber("orders").group_id("billing").handle(|_: String| async {});
    /// let app = ferrostream::App::new(broker).start().await?;
    /// app.abort().await;
    /// # Ok(()) }
    /// ```
    pub async fn abort(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        #[cfg(feature = "http")]
        if let Some(server) = self.http.take() {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// How long the subscribers may take to stop.
    fn limit(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(5)
    }
}

/// The service's HTTP server of a running app.
#[cfg(feature = "http")]
struct HttpServer {
    addr: std::net::SocketAddr,
    health: Arc<crate::http::Health>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

#[cfg(feature = "http")]
impl App {
    /// Binds and serves the HTTP routes, if asked to (before any subscriber starts).
    async fn serve_http(&self) -> Result<Option<HttpServer>, StartError> {
        let Some((addr, _allow_publish)) = self.http.clone() else {
            return Ok(None);
        };
        let health = crate::http::Health::new(self.broker.clone(), self.broker_down_limit);
        #[allow(unused_mut)]
        let mut router = crate::http::routes(health.clone());
        #[cfg(feature = "docs")]
        {
            router = router.merge(crate::docs::Docs::new(self)?.allow_publish(_allow_publish).router());
        }
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Http {
                addr: addr.clone(),
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StartError::Http { addr, source })?;
        tracing::info!(url = %format!("http://{bound}"), "serving health probes, metrics and docs");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the HTTP server failed");
            }
        });
        Ok(Some(HttpServer {
            addr: bound,
            health,
            stop,
            task,
        }))
    }
}
