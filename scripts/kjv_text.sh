#!/usr/bin/env bash
# Writes the King James Version of the Bible (1611; public domain: the copyright expired long ago,
# see /usr/share/doc/bible-kjv-text/copyright) as plain UTF-8, one verse per line, to $1.
# Source: Debian's `bible-kjv` + `bible-kjv-text` packages (the text ships on the package mirror,
# no other network access is needed).
set -euo pipefail
out=${1:?usage: scripts/kjv_text.sh OUT.txt}
if ! command -v bible >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv >/dev/null
fi
bible -f "Ge1:1-Re22:21" </dev/null | sed -n -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ (.*)$/\1/p' > "$out"
echo "$(wc -l < "$out") verses, $(wc -c < "$out") bytes -> $out" >&2
