#!/usr/bin/env bash
# Render a kukla report.html in headless Chromium and save a PNG screenshot of it.
#
# Why: report.html must be self-contained (figures inlined as base64 PNG, data as embedded
# JSON, no URLs); a headless browser that may fetch nothing, showing every figure and the
# latent browser working, is the proof. Look at the screenshots before calling a report done.
#
# Usage:  scripts/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT] [VIEW]
#   REPORT_DIR_OR_HTML  the report directory `kukla evaluate --out` wrote, or its report.html
#   OUT.png             where the screenshot goes (default: report.png beside report.html)
#   WIDTHxHEIGHT        window size (default 1400x3000: tall enough for several figures)
#   VIEW                latent=D:I (dictionary D's latent I open in the browser), sweep (the
#                       frontiers), tree (the Matryoshka tree), training; default: the whole page
#
# Needs Debian's `chromium` (as root: apt-get install -y chromium) and the playwright Python
# package (in kukla's test extras), which drives that Chromium; no browser is downloaded.
# Every request other than the file itself is aborted, so a figure that relied on a URL
# would show as missing and the script fails.
set -euo pipefail

target=${1:?usage: scripts/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT] [VIEW]}
html=$target
[[ -d $target ]] && html=$target/report.html
[[ -f $html ]] || { echo "error: $html does not exist: run kukla evaluate first" >&2; exit 2; }
out=${2:-$(dirname "$html")/report.png}
size=${3:-1400x3000}
view=${4:-}
browser=$(command -v chromium || command -v chromium-browser || true)
[[ -n $browser ]] || { echo "error: no chromium found: apt-get install -y chromium (as root)" >&2; exit 2; }

python3 - "$browser" "$(realpath "$html")" "$(realpath -m "$out")" "$size" "$view" <<'PY'
import sys
import tempfile

from playwright.sync_api import sync_playwright

browser, html, out, size, view = sys.argv[1:]
width, height = (int(v) for v in size.split("x"))
url = "file://" + html
outside = []
with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
    context = p.chromium.launch_persistent_context(
        profile, executable_path=browser, headless=True, viewport={"width": width, "height": height},
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"])
    page = context.new_page()
    page.route("**/*", lambda r: r.continue_() if r.request.url.split("#")[0] == url
               else (outside.append(r.request.url), r.abort()))
    page.goto(url + (f"#{view}" if view.startswith("latent=") else ""))
    page.wait_for_selector("body[data-ready='1']")
    if view.startswith("latent="):
        page.wait_for_selector("#latent-title")
    if view:
        page.locator("#browser" if view.startswith("latent=") else f"#{view}").evaluate("e => e.scrollIntoView()")
    page.screenshot(path=out, full_page=not view)
    context.close()
if outside:
    sys.exit(f"error: report.html requested {outside}")
PY
[[ -s $out ]] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "screenshot: $out"
