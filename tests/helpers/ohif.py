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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers.peers import orthanc_binary

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


TIMEOUT_MS = 180_000  # a loaded 2-core machine renders WebGL on the CPU

#: A returning radiologist: the first-visit tour (an overlay over the viewer) seen before.
RETURNING_USER_JS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"

#: The SR display set's measurements as OHIF merged them, and the annotations drawn.
SR_STATE_JS = """(uid) => {
  const ds = window.services.displaySetService.getDisplaySetByUID(uid);
  const drawn = window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata.toolName === 'DICOMSRDisplay');
  return {
    measurements: (ds.measurements || []).map(m => ({
      uid: m.TrackingUniqueIdentifier, loaded: m.loaded, labels: m.labels,
      lines: m.coords.filter(c => c.GraphicType === 'POLYLINE').map(c => Array.from(c.GraphicData)),
    })),
    annotations: drawn.map(a => ({
      uid: a.annotationUID, lines: (a.data.renderableData.POLYLINE || []).length, labels: a.data.labels,
    })),
  };
}"""

#: What Cornerstone drew in the SVG layer of the viewport now shown: per annotation its text
#: lines, and the measurement lines (dashed 4,4; the text box's link line is dashed 2,3).
SVG_DRAWN_JS = """() => {
  const layer = document.querySelector('.svg-layer');
  const texts = {};
  for (const g of layer.querySelectorAll('g[data-annotation-uid]')) {
    texts[g.dataset.annotationUid] = Array.from(g.querySelectorAll('tspan')).map(t => t.textContent);
  }
  return {texts, lines: layer.querySelectorAll('line[stroke-dasharray="4,4"]').length};
}"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not OHIF_DIST.joinpath("index.html").exists():
        return f"OHIF's dist/ not in {OHIF_DIST.relative_to(ROOT)} (`make ohif`; `make test` runs it)"
    if chromium_binary() is None:
        return "chromium not installed (Debian package chromium; `make test` installs it)"
    if orthanc_binary() is None:
        return "Orthanc not installed (`make test` installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright (Python) missing: `pip install -e '.[dev]'`"
    return None


@contextmanager
def ohif_page(orthanc_url: str, study: str, series: int, seen: dict) -> Iterator:
    """A page of OHIF showing `study` (once its `series` display sets are there), served
    over the Orthanc at `orthanc_url`; uncaught page errors and console errors go into
    `seen["page_errors"]` and `seen["console_errors"]`."""
    from playwright.sync_api import sync_playwright

    with OhifSite(orthanc_url) as site, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_binary(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.add_init_script(RETURNING_USER_JS)
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
            page.on(
                "console",
                lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None,
            )
            open_study(page, site.url, study, series)
            yield page
        finally:
            browser.close()


def open_study(page, url: str, study: str, series: int) -> None:
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study}")
    page.wait_for_function(
        "(n) => window.services && window.services.displaySetService.getActiveDisplaySets().length >= n",
        arg=series,
    )
    notice = page.get_by_role("button", name="Confirm and hide")  # investigational use
    if notice.count():
        notice.first.click()


def display_sets(page) -> dict[str, str]:
    """Modality -> display set UID of the study's series."""
    sets = page.evaluate(
        "() => window.services.displaySetService.getActiveDisplaySets()"
        ".map(d => ({uid: d.displaySetInstanceUID, modality: d.Modality}))"
    )
    return {d["modality"]: d["uid"] for d in sets}


def settled(page, script: str, arg=None, every: float = 1.0, rounds: int = 60):
    """`script`'s value once two readings a second apart agree (loading has finished)."""
    last = None
    for _ in range(rounds):
        value = page.evaluate(script, arg)
        if value and value == last:
            return value
        last = value
        time.sleep(every)
    return last


def open_sr(page, sr_uid: str) -> tuple[dict, dict]:
    """Double-click the SR's thumbnail, as a radiologist does, and wait until OHIF has
    hydrated it and drawn its lines: (SR state, drawn SVG) once both have settled."""
    page.dblclick(f"#thumbnail-{sr_uid}")
    page.wait_for_function(
        "() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
        ".some(a => a.metadata.toolName === 'DICOMSRDisplay')"
    )
    state = settled(page, SR_STATE_JS, sr_uid)
    page.wait_for_function(f"() => ({SVG_DRAWN_JS})().lines > 0")
    return state, settled(page, SVG_DRAWN_JS)


def frame(page, centre_lps: list[float], factor: float = 4.0) -> None:
    """Centre the active viewport on `centre_lps` within the slice shown, and zoom in (the
    nodes are small beside the whole body): for the screenshots only."""
    page.evaluate(
        """([c, f]) => {
          const id = window.services.viewportGridService.getActiveViewportId();
          const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
          const cam = vp.getCamera();
          const n = cam.viewPlaneNormal;
          const along = [0, 1, 2].reduce((s, i) => s + (c[i] - cam.focalPoint[i]) * n[i], 0);
          const focal = [0, 1, 2].map(i => c[i] - along * n[i]);
          const position = [0, 1, 2].map(i => focal[i] + cam.position[i] - cam.focalPoint[i]);
          vp.setCamera({focalPoint: focal, position});
          vp.setZoom(f);
          vp.render();
        }""",
        [centre_lps, factor],
    )
    time.sleep(1)
