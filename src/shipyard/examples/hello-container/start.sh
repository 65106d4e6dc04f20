#!/bin/sh
# The image's entrypoint: httpd on $PORT serving /www. A release's behaviour comes from
# /app/*.txt, as in the hello example: version.txt; unhealthy_after.txt (seconds after start
# /health starts failing: 404); error_rate.txt (0..1 of GET / answer 500); delay_ms.txt (every
# GET / takes that long). /health is the static /tmp/health (removed to fail); GET / is the
# static /tmp/index.html for a good release (no process per request), and for a bad one, where
# it is not written, httpd falls back to cgi-bin/index.cgi.
set -eu
VERSION=$(cat /app/version.txt)
ERROR_PCT=0
DELAY_US=0
if [ -f /app/error_rate.txt ]; then ERROR_PCT=$(awk '{ print int($1 * 100 + 0.5) }' /app/error_rate.txt); fi
if [ -f /app/delay_ms.txt ]; then DELAY_US=$(awk '{ print int($1 * 1000) }' /app/delay_ms.txt); fi
export VERSION ERROR_PCT DELAY_US
echo ok > /tmp/health
if [ "$ERROR_PCT" -eq 0 ] && [ "$DELAY_US" -eq 0 ]; then
    echo "hello from $VERSION" > /tmp/index.html
fi
# Every interface: with a published port the engine forwards to the container's own address.
httpd -f -p "$PORT" -h /www &
server=$!
if [ -f /app/unhealthy_after.txt ]; then
    (sleep "$(cat /app/unhealthy_after.txt)" && rm -f /tmp/health) &
fi
# Forward docker stop's TERM to httpd, so the container ends at once; without an init this
# shell is PID 1, which would ignore a signal it has no handler for.
trap 'kill "$server"; exit 0' TERM INT
wait "$server"
