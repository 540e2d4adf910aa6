//! The service's docs page and AsyncAPI documents over HTTP (feature `docs`), on axum.
//!
//! | path | what |
//! |---|---|
//! | `/docs` | a self-contained HTML page (no CDN, nothing fetched at view time): servers, channels, operations, messages with their schemas and example payloads |
//! | `/asyncapi.json`, `/asyncapi.yaml` | the [AsyncAPI document](crate::asyncapi) for standard tooling |
//! | `POST /docs/publish` | only with [`allow_publish`](Docs::allow_publish): the page's form publishes a test message to a documented channel |
//!
//! Publishing from the page is off by default: a docs page must not become a way into production.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ferrostream::{App, Broker, docs::Docs};
//! let broker = Broker::new("memory://")?;
//! broker.subscriber("orders").handle(|body: String| async move { println!("{body}") });
//! let app = App::new(broker).title("shop");
//! // Serves http://127.0.0.1:8000/docs until Ctrl-C.
//! Docs::new(&app)?.serve("127.0.0.1:8000", async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::asyncapi::Document;
use crate::broker::Broker;
use crate::error::ConfigError;

/// The page, with two placeholders: the document and the page's settings.
const PAGE: &str = include_str!("page.html");

/// Why the docs server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocsError {
    /// The address is taken or not this machine's.
    #[error("cannot listen on {addr}: {source} (is another process using the port? choose another with --port)")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("the docs server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The docs page and documents of an app, ready to serve.
#[derive(Clone)]
pub struct Docs {
    inner: Arc<Inner>,
}

struct Inner {
    document: Document,
    broker: Broker,
    publish: bool,
}

impl std::fmt::Debug for Docs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docs")
            .field("broker", &self.inner.broker.url())
            .field("publish", &self.inner.publish)
            .finish()
    }
}

impl Docs {
    /// The docs of `app` as it is declared now (fails like the app's start would on a subscriber declared
    /// wrong).
    pub fn new(app: &crate::App) -> Result<Self, ConfigError> {
        Ok(Docs {
            inner: Arc::new(Inner {
                document: app.asyncapi()?,
                broker: app.broker().clone(),
                publish: false,
            }),
        })
    }

    /// Lets the page publish a test message to a documented channel, through the app's broker (off by
    /// default).
    pub fn allow_publish(self, allow: bool) -> Self {
        Docs {
            inner: Arc::new(Inner {
                document: self.inner.document.clone(),
                broker: self.inner.broker.clone(),
                publish: allow,
            }),
        }
    }

    /// The document served.
    pub fn document(&self) -> &Document {
        &self.inner.document
    }

    /// The page's HTML: the document and settings inlined, safe inside `<script>`.
    pub fn html(&self) -> String {
        let config = json!({ "publish": self.inner.publish, "publishUrl": "publish" });
        PAGE.replace("{{ASYNCAPI_JSON}}", &script_json(self.inner.document.as_json()))
            .replace("{{CONFIG_JSON}}", &script_json(&config))
    }

    /// The routes, to serve on your own axum server (merge them) or with [`serve`](Self::serve).
    pub fn router(&self) -> axum::Router {
        let router = axum::Router::new()
            .route("/", get(|| async { Redirect::temporary("/docs") }))
            .route("/docs", get(page))
            .route("/docs/", get(|| async { Redirect::permanent("/docs") }))
            .route("/asyncapi.json", get(document_json))
            .route("/asyncapi.yaml", get(document_yaml));
        let router = if self.inner.publish {
            router.route("/docs/publish", post(publish))
        } else {
            router.route("/docs/publish", post(publish_off))
        };
        router.with_state(self.clone())
    }

    /// Serves the routes on `addr` (e.g. `127.0.0.1:8000`) until `shutdown` completes. Fails at once if
    /// the address cannot be bound.
    pub async fn serve(self, addr: &str, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), DocsError> {
        let listener = self.bind(addr).await?;
        self.serve_on(listener, shutdown).await
    }

    /// Binds `addr` (port 0: any free port; `local_addr` tells which).
    pub async fn bind(&self, addr: &str) -> Result<tokio::net::TcpListener, DocsError> {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DocsError::Bind {
                addr: addr.to_owned(),
                source,
            })
    }

    /// Serves the routes on a bound listener until `shutdown` completes.
    pub async fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DocsError> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(url = %format!("http://{addr}/docs"), publish = self.inner.publish, "serving the docs page");
        }
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(DocsError::Serve)
    }
}

/// JSON for inside a `<script>` element: no `<` that could close it.
fn script_json(value: &serde_json::Value) -> String {
    serde_json::to_string(value).unwrap_or_default().replace('<', "\\u003c")
}

async fn page(State(docs): State<Docs>) -> Html<String> {
    Html(docs.html())
}

async fn document_json(State(docs): State<Docs>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        docs.inner.document.to_json_pretty(),
    )
        .into_response()
}

async fn document_yaml(State(docs): State<Docs>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        docs.inner.document.to_yaml(),
    )
        .into_response()
}

/// What the page's form sends.
#[derive(Debug, Deserialize)]
struct PublishForm {
    channel: String,
    payload: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn refused(status: StatusCode, error: String) -> Response {
    (status, axum::Json(json!({ "ok": false, "error": error }))).into_response()
}

async fn publish(State(docs): State<Docs>, body: axum::body::Bytes) -> Response {
    let form: PublishForm = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return refused(StatusCode::BAD_REQUEST, format!("not a publish request: {e}")),
    };
    // Only to a channel the document shows: the form is for trying the service, not for any topic.
    let documented = docs.inner.document.as_json()["channels"]
        .as_object()
        .is_some_and(|channels| channels.values().any(|c| c["address"] == form.channel.as_str()));
    if !documented {
        return refused(
            StatusCode::NOT_FOUND,
            format!("`{}` is not a channel of this service", form.channel),
        );
    }
    let mut publish = docs.inner.broker.publish(form.payload, &form.channel);
    if let Some(key) = form.key.filter(|k| !k.is_empty()) {
        publish = publish.key(key);
    }
    for (name, value) in form.headers {
        publish = publish.header(name, value);
    }
    match publish.await {
        Ok(ack) => {
            let receipt = if ack.offset >= 0 {
                format!("{} partition {} offset {}", ack.topic, ack.partition, ack.offset)
            } else {
                format!("{} (confirmed by the broker)", ack.topic)
            };
            tracing::info!(channel = %form.channel, %receipt, "published a test message from the docs page");
            (StatusCode::OK, axum::Json(json!({ "ok": true, "receipt": receipt }))).into_response()
        }
        Err(e) => refused(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

async fn publish_off() -> Response {
    refused(
        StatusCode::FORBIDDEN,
        "publishing from the docs page is off (serve it with `docs serve --allow-publish`)".to_owned(),
    )
}
