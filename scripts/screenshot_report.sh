#!/usr/bin/env bash
# Render a kukla report.html in headless Chromium and save a PNG screenshot of it.
#
# Why: report.html must be self-contained (figures inlined as base64 PNG, no URLs); a
# headless browser with no network showing every figure is the proof. The test suite does
# not need Chromium; run this by hand (or in a job) after `kukla evaluate`.
#
# Usage:  scripts/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]
#   REPORT_DIR_OR_HTML  the report directory `kukla evaluate --out` wrote, or its report.html
#   OUT.png             where the screenshot goes (default: report.png beside report.html)
#   WIDTHxHEIGHT        window size (default 1400x3000: tall enough for several figures)
#
# Needs Debian's `chromium` (as root: apt-get install -y chromium). Runs with
# --headless --no-sandbox --disable-gpu (containers have no sandbox and no GPU) and
# with networking pointed nowhere, so a figure that relied on a URL would show as missing.
set -euo pipefail

target=${1:?usage: scripts/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]}
html=$target
[[ -d $target ]] && html=$target/report.html
[[ -f $html ]] || { echo "error: $html does not exist: run kukla evaluate first" >&2; exit 2; }
out=${2:-$(dirname "$html")/report.png}
size=${3:-1400x3000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "error: no chromium found: apt-get install -y chromium (as root)" >&2; exit 2; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --proxy-server="127.0.0.1:9" --proxy-bypass-list="<-loopback>" \
    --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" \
    "file://$(realpath "$html")" 2>/dev/null
[[ -s $out ]] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "screenshot: $out"
