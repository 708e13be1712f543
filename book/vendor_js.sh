#!/usr/bin/env bash
# Vendor the JavaScript the static book needs, so no page loads anything from a CDN:
#   * @jupyter-widgets/html-manager: dist/embed.js, the require.js-free bundle that renders the
#     saved widget state of executed notebooks (built-in controls and outputs), plus the font
#     files its CSS points at (resolved relative to the script, next to it);
#   * mathjax@3: es5/tex-chtml.js with the components it loads on demand (TeX extensions,
#     CommonHTML fonts, menu, accessibility).
# Fetched with `npm pack` from the npm registry into book/_static/vendor/ (git-ignored).
# Usage: book/vendor_js.sh [--force]
set -euo pipefail
cd "$(dirname "$0")"
HTML_MANAGER_VERSION=1.0.15   # the html-manager release of ipywidgets 8.1
MATHJAX_VERSION=3.2.2
OUT=_static/vendor
STAMP="$OUT/.vendored-$HTML_MANAGER_VERSION-$MATHJAX_VERSION"

if [[ "${1:-}" != "--force" && -f "$STAMP" ]]; then
  exit 0
fi
command -v npm >/dev/null || { echo "vendor_js.sh: npm is required (apt-get install -y npm)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" "mathjax@$MATHJAX_VERSION" >/dev/null)

rm -rf "$OUT"
mkdir -p "$OUT/html-manager" "$OUT/mathjax"

mkdir "$tmp/hm" "$tmp/mj"
tar xzf "$tmp/jupyter-widgets-html-manager-$HTML_MANAGER_VERSION.tgz" -C "$tmp/hm"
dist="$tmp/hm/package/dist"
cp "$dist/embed.js" "$dist/embed.js.LICENSE.txt" "$OUT/html-manager/"
cp "$dist"/*.woff "$dist"/*.woff2 "$dist"/*.ttf "$dist"/*.eot "$dist"/*.svg "$OUT/html-manager/"
cp "$tmp/hm/package/LICENSE" "$OUT/html-manager/LICENSE" 2>/dev/null || true

tar xzf "$tmp/mathjax-$MATHJAX_VERSION.tgz" -C "$tmp/mj"
es5="$tmp/mj/package/es5"
cp "$es5/tex-chtml.js" "$OUT/mathjax/"
cp -r "$es5/input" "$es5/output" "$es5/ui" "$es5/a11y" "$es5/sre" "$es5/adaptors" "$OUT/mathjax/"
rm -rf "$OUT/mathjax/output/svg" "$OUT/mathjax/output/svg.js"
cp "$tmp/mj/package/LICENSE" "$OUT/mathjax/LICENSE"

touch "$STAMP"
echo "vendored html-manager $HTML_MANAGER_VERSION and mathjax $MATHJAX_VERSION into book/$OUT ($(du -sh "$OUT" | cut -f1))"
