#!/usr/bin/env bash
# Fetch the pinned browser libraries from the npm registry into frontend/vendor/ (git-ignored).
# Run by `make install`; does nothing when the pinned versions are already there. Node.js is only
# used when present (`npm pack`); otherwise the same tarball is downloaded with curl. Every tarball
# is checked against its pinned sha512 integrity before anything is copied out of it.
set -euo pipefail
cd "$(dirname "$0")"
REGISTRY="${NPM_REGISTRY:-https://registry.npmjs.org}"
# name version integrity file-in-package file-in-vendor
PINS=(
  "chart.js 4.5.1 sha512-GIjfiT9dbmHRiYi6Nl2yFCq7kkwdkp1W/lp2J99rX0yo9tgJGn3lKQATztIjb5tVtevcBtIdICNWqlq5+E8/Pw== dist/chart.umd.js chart.umd.js"
  "js-yaml 4.1.0 sha512-wpxZs9NoxZaJESJGIZTyDEaYpl0FKSA+FB9aJiyemKhMwkxQg63h4T1KJgUGHpTqPDNRcmmYLugrRjJlBtWvRA== dist/js-yaml.mjs js-yaml.mjs"
)
STAMP=vendor/VERSIONS
WANT=$(printf '%s\n' "${PINS[@]}" | awk '{print $1"@"$2" "$5}')
if [[ -f $STAMP && "$(cat $STAMP)" == "$WANT" ]] && awk '{print "vendor/"$2}' $STAMP | xargs ls >/dev/null 2>&1; then
  exit 0
fi
mkdir -p vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for pin in "${PINS[@]}"; do
  read -r name version integrity src dest <<<"$pin"
  tarball="$tmp/$name-$version.tgz"
  if command -v npm >/dev/null 2>&1; then
    (cd "$tmp" && npm pack --silent --registry "$REGISTRY" "$name@$version" >/dev/null)
  else
    curl -fsSL --retry 3 -o "$tarball" "$REGISTRY/$name/-/$name-$version.tgz"
  fi
  actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  if [[ "$actual" != "$integrity" ]]; then
    echo "fetch-vendor: $name@$version integrity mismatch ($actual)" >&2
    exit 1
  fi
  mkdir -p "$tmp/$name"
  tar -xzf "$tarball" -C "$tmp/$name"
  cp "$tmp/$name/package/$src" "vendor/$dest"
  cp "$tmp/$name/package/LICENSE"* "vendor/$dest.LICENSE" 2>/dev/null || true
done
echo "$WANT" >$STAMP
echo "fetch-vendor: $(echo $WANT | tr '\n' ' ')"
