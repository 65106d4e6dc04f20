#!/bin/sh
# GET /: "hello from <version>"; ERROR_PCT percent of answers are 500s; each waits DELAY_US.
if [ "$DELAY_US" -gt 0 ]; then usleep "$DELAY_US"; fi
if [ "$ERROR_PCT" -gt 0 ] && [ $((RANDOM % 100)) -lt "$ERROR_PCT" ]; then
    status="500 Internal Server Error"
    body="$VERSION failed"
else
    status="200 OK"
    body="hello from $VERSION"
fi
printf 'Status: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n' \
    "$status" $((${#body} + 1)) "$body"
