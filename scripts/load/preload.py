#!/usr/bin/env python3
"""Preloads USERS users x EVENTS events (random ml-100k item ids, 2-minute gaps) into a server."""
import json
import random
import sys
import urllib.request

base, users, events, items = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(1)
batch = []


def flush():
    body = json.dumps({"events": batch}).encode()
    request = urllib.request.Request(f"{base}/v1/events", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as reply:
        assert reply.status == 200, reply.read()
    batch.clear()


for u in range(users):
    start = 1_700_000_000 + rng.randrange(86_400)
    for e in range(events):
        batch.append({"user_id": f"u{u}", "item_id": str(rng.randint(1, items)), "timestamp": start + 120 * e})
        if len(batch) == 1000:
            flush()
if batch:
    flush()
