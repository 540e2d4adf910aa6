//! What the docs tests share: a minimal HTTP client and the Node tools of `tools/docs` (installed by
//! `scripts/test-tools.sh`, which `scripts/test.sh` runs).
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Command, Output};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/docs")
}

/// Runs `node tools/docs/<script> args...`; panics with the fix if the tools are not installed.
pub fn node_tool(script: &str, args: &[&str]) -> Output {
    let dir = tools_dir();
    assert!(
        dir.join("node_modules/@asyncapi/parser").exists() && dir.join("node_modules/playwright-core").exists(),
        "the docs tools are not installed: run scripts/test-tools.sh (scripts/test.sh does)"
    );
    Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .output()
        .expect("node runs (Node.js is on the machine)")
}

/// Validates documents with the official AsyncAPI parser; the parser's own report on failure.
pub fn assert_valid_asyncapi(files: &[&std::path::Path]) {
    let args: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let out = node_tool("validate.mjs", &args);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the AsyncAPI parser rejects the document:\n{report}"
    );
    assert_eq!(report.matches("OK ").count(), files.len(), "{report}");
}

/// Where a person finds what the tests leave to look at (screenshots): `<target>/artifacts`.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("artifacts");
    std::fs::create_dir_all(&dir).expect("create the artifacts folder");
    dir
}

/// One HTTP/1.1 request; the status and body.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}
