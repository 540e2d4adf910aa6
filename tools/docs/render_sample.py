#!/usr/bin/env python3
"""Render src/docs/page.html with an AsyncAPI document, the way the Rust server does.

    python3 tools/docs/render_sample.py [--doc FILE] [--no-publish] [--out PATH]
    python3 tools/docs/render_sample.py --serve PORT [--no-publish] [--fail-publish]

Without --serve it writes the page (default /tmp/docs-sample.html). With --serve it
also serves it on 127.0.0.1:PORT at /docs (re-rendered from page.html on each GET), and answers POST /docs/publish with
{"ok": true, "receipt": "partition 0 offset N"} (or, with --fail-publish, a 502
{"ok": false, "error": ...}), checking the request shape the page must send.
Each publish request is printed to stdout as one JSON line.
"""
import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DOC_PLACEHOLDER = "{{ASYNCAPI_JSON}}"
CFG_PLACEHOLDER = "{{CONFIG_JSON}}"


def script_json(value):
    """JSON that is safe inside <script type="application/json">: escape '<' as \\u003c."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def render(doc, publish):
    page = (ROOT / "src" / "docs" / "page.html").read_text(encoding="utf-8")
    for ph in (DOC_PLACEHOLDER, CFG_PLACEHOLDER):
        if page.count(ph) != 1:
            sys.exit(f"page.html must contain {ph} exactly once (found {page.count(ph)})")
    cfg = {"publish": publish, "publishUrl": "publish"}
    return page.replace(DOC_PLACEHOLDER, script_json(doc)).replace(CFG_PLACEHOLDER, script_json(cfg))


def serve(port, make_html, fail):
    state = {"offset": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

        def send(self, status, ctype, data):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def send_json(self, status, obj):
            self.send(status, "application/json", json.dumps(obj).encode("utf-8"))

        def do_GET(self):
            if self.path.split("?")[0] in ("/docs", "/docs/"):
                self.send(200, "text/html; charset=utf-8", make_html().encode("utf-8"))
            else:
                self.send(404, "text/plain; charset=utf-8", b"not found\n")

        def do_POST(self):
            if self.path.split("?")[0] != "/docs/publish":
                return self.send_json(404, {"ok": False, "error": "not found"})
            if not self.headers.get("Content-Type", "").startswith("application/json"):
                return self.send_json(415, {"ok": False, "error": "Content-Type must be application/json"})
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                req = json.loads(raw)
                assert isinstance(req, dict), "body must be an object"
                assert isinstance(req.get("channel"), str), "channel must be a string"
                assert isinstance(req.get("payload"), str), "payload must be a string"
                assert req.get("key") is None or isinstance(req.get("key"), str), "key must be a string or null"
                hdrs = req.get("headers")
                assert isinstance(hdrs, dict) and all(isinstance(v, str) for v in hdrs.values()), "headers must map names to strings"
            except (ValueError, AssertionError) as e:
                return self.send_json(400, {"ok": False, "error": f"bad publish request: {e}"})
            print(json.dumps({"publish": req}), flush=True)
            if fail:
                return self.send_json(502, {"ok": False, "error": f"broker refused the message for {req['channel']}"})
            state["offset"] += 1
            self.send_json(200, {"ok": True, "receipt": f"partition 0 offset {state['offset']}"})

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving http://127.0.0.1:{srv.server_address[1]}/docs", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", default=str(HERE / "sample-asyncapi.json"), help="AsyncAPI JSON document")
    ap.add_argument("--out", default="/tmp/docs-sample.html", help="where to write the rendered page")
    ap.add_argument("--no-publish", action="store_true", help='render with {"publish": false}')
    ap.add_argument("--serve", type=int, metavar="PORT", help="serve the page at http://127.0.0.1:PORT/docs")
    ap.add_argument("--fail-publish", action="store_true", help="answer publishes with an error")
    args = ap.parse_args()
    doc = json.loads(Path(args.doc).read_text(encoding="utf-8"))
    html = render(doc, not args.no_publish)
    Path(args.out).write_text(html, encoding="utf-8")
    print(f"wrote {args.out} ({len(html.encode('utf-8'))} bytes, publish={'off' if args.no_publish else 'on'})", flush=True)
    if args.serve is not None:
        serve(args.serve, lambda: render(doc, not args.no_publish), args.fail_publish)


if __name__ == "__main__":
    main()
