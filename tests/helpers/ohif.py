"""OHIF, the web viewer in front of many open-source PACS, served here for the browser tests.

`make ohif` unpacks the prebuilt viewer (`npm pack @ohif/app@<version>`, its `dist/`) into
`.cache/ohif/<version>/dist` (outside git). `OhifSite` serves it on 127.0.0.1 the way the
compose deployment does (deploy/ohif/): the static files with the headers OHIF's
shared-memory decoders need (COOP/COEP), `deploy/ohif/app-config.js`, and `/dicom-web/`
proxied to Orthanc's DICOMweb plugin, so that viewer and archive share one origin.
"""

from __future__ import annotations

import mimetypes
import shutil
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
OHIF_DIST = ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist"
APP_CONFIG = ROOT / "deploy" / "ohif" / "app-config.js"
#: Headers every response carries: cross-origin isolation for SharedArrayBuffer.
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Chromium flags: WebGL on the CPU (SwiftShader), and no traffic to the outside.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def chromium_binary() -> str | None:
    """Debian's chromium (`make test` installs it)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Handler(BaseHTTPRequestHandler):
    dist: Path
    upstream: str  # Orthanc's base URL, e.g. http://127.0.0.1:8042

    def log_message(self, format: str, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, **ISOLATION}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        keep = ("Accept", "Content-Type")
        request = urllib.request.Request(
            self.upstream + self.path,
            data=body,
            method=self.command,
            headers={k: self.headers[k] for k in keep if self.headers.get(k)},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, data, ctype = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as e:
            status, data, ctype = e.code, e.read(), e.headers.get("Content-Type")
        self._send(status, data, {"Content-Type": ctype or "application/octet-stream"})

    def _static(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            file = APP_CONFIG
        else:
            file = (self.dist / path.lstrip("/")).resolve()
            if not file.is_relative_to(self.dist) or not file.is_file():
                file = self.dist / "index.html"  # the viewer's own routes
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(200, file.read_bytes(), {"Content-Type": ctype})

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._static()

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._proxy()


class OhifSite:
    """OHIF's `dist/` and Orthanc's DICOMweb behind one address on 127.0.0.1."""

    def __init__(self, orthanc_url: str, dist: Path = OHIF_DIST):
        handler = type("Handler", (_Handler,), {"dist": dist.resolve(), "upstream": orthanc_url})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OhifSite:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
