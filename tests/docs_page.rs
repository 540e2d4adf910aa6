//! The docs page in a real browser (Debian's chromium, headless, driven by playwright-core): every
//! channel, operation and message of the service is visible, the console stays clean, a test message
//! sent from the page's form reaches the subscriber, and without `allow_publish` there is no form and
//! the endpoint refuses. A screenshot is kept in `<target>/artifacts/docs-page.png`.
#![cfg(feature = "docs")]

mod common;
#[path = "common/web.rs"]
mod web;

use std::time::Duration;

use ferrostream::docs::Docs;
use ferrostream::{App, Json, OffsetReset};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// An order placed in the shop.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Order {
    /// The order's number.
    id: u64,
    /// What was ordered.
    items: Vec<String>,
}

/// What is paid for an order.
#[derive(Serialize, Deserialize, JsonSchema)]
struct Invoice {
    order: u64,
}

struct Served {
    addr: std::net::SocketAddr,
    names: std::path::PathBuf,
    orders: String,
    received: mpsc::UnboundedReceiver<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    app: ferrostream::RunningApp,
}

/// A running shop app (on the test broker) with its docs page served on a free port.
async fn serve(allow_publish: bool) -> Served {
    let broker = common::broker();
    let orders = common::topic(&broker, "docs-orders", 1).await;
    let invoices = common::topic(&broker, "docs-invoices", 1).await;
    let (tx, received) = mpsc::unbounded_channel();
    broker
        .subscriber(&orders)
        .name("billing")
        .group_id(common::unique("docs"))
        .auto_offset_reset(OffsetReset::Earliest)
        .description("Bills each order.")
        .publish_to(&invoices)
        .handle(move |Json(order): Json<Order>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(order.id);
                Json(Invoice { order: order.id })
            }
        });
    let _audit = broker.publisher("docs-audit").description("The audit trail.");
    let app = App::new(broker.clone()).title("docs test shop").version("1.0.0");
    let docs = Docs::new(&app).unwrap().allow_publish(allow_publish);
    let names = web::artifacts_dir().join(format!("names-{}.json", common::unique("n")));
    std::fs::write(&names, serde_json::to_string(&docs.document().names()).unwrap()).unwrap();
    let listener = docs.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(docs.serve_on(listener, async move {
        let _ = stopped.await;
    }));
    let app = app
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("app starts");
    Served {
        addr,
        names,
        orders,
        received,
        stop: Some(stop),
        app,
    }
}

impl Served {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.app.shutdown().await.unwrap();
    }
}

/// Runs the browser check; its JSON summary.
async fn browser_check(args: Vec<String>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        web::node_tool("browser-check.mjs", &args)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser check failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().last().expect("a summary line");
    serde_json::from_str(summary).unwrap_or_else(|e| panic!("summary {summary}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_the_whole_service_and_its_form_publishes_to_the_subscriber() {
    let mut s = serve(true).await;
    let screenshot = web::artifacts_dir().join("docs-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let summary = browser_check(vec![
        "--url".into(),
        format!("http://{}/docs", s.addr),
        "--expect-names".into(),
        s.names.display().to_string(),
        "--screenshot".into(),
        screenshot.display().to_string(),
        "--publish-channel".into(),
        s.orders.clone(),
        "--publish-payload".into(),
        r#"{"id": 4242, "items": ["tea"]}"#.into(),
    ])
    .await;
    assert_eq!(summary["missing"], serde_json::json!([]));
    assert_eq!(summary["console"], serde_json::json!([]), "console errors or warnings");
    assert!(
        summary["publish"].as_str().unwrap().starts_with("Published:"),
        "{summary}"
    );
    // The message the form sent was handled by the subscriber.
    let id = tokio::time::timeout(common::WAIT, s.received.recv())
        .await
        .expect("the subscriber receives the message sent from the page")
        .unwrap();
    assert_eq!(id, 4242);
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "a screenshot was kept"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_allow_publish_there_is_no_form_and_the_endpoint_refuses() {
    let mut s = serve(false).await;
    let summary = browser_check(vec![
        "--url".into(),
        format!("http://{}/docs", s.addr),
        "--expect-names".into(),
        s.names.display().to_string(),
        "--expect-no-form".into(),
    ])
    .await;
    assert_eq!(summary["missing"], serde_json::json!([]));
    let body = format!(r#"{{"channel": "{}", "payload": "{{}}"}}"#, s.orders);
    let (status, answer) = web::http(s.addr, "POST", "/docs/publish", Some(&body)).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("--allow-publish"), "{answer}");
    assert!(s.received.try_recv().is_err(), "nothing was published");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documents_are_served_as_json_and_yaml_and_the_form_publishes_only_to_documented_channels() {
    let s = serve(true).await;
    let (status, json) = web::http(s.addr, "GET", "/asyncapi.json", None).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["info"]["title"], "docs test shop");
    let (status, yaml) = web::http(s.addr, "GET", "/asyncapi.yaml", None).await;
    assert_eq!(status, 200);
    let yaml: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(yaml, json);
    let (status, page) = web::http(s.addr, "GET", "/docs", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("docs test shop") && !page.contains("{{ASYNCAPI_JSON}}"));
    let (status, answer) = web::http(
        s.addr,
        "POST",
        "/docs/publish",
        Some(r#"{"channel": "not-documented", "payload": "x"}"#),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    s.stop().await;
}
