#!/usr/bin/env python3
"""Asks a running `xsrec serve` of an ML-1M model for the top 10 of some users, with seen items
left out and not, and counts the movies each user had rated among them.

Each user's events but the last go in over /v1/events; the recommendation is asked at the last
one's moment. Usage: scripts/served_seen_1m.py http://127.0.0.1:8080 1m_1 1m_10 1m_4169
"""
import json, sys, urllib.request
base, users = sys.argv[1], sys.argv[2:]
rows = {}
for line in open('data/ml-1m/ml-1m.inter', encoding='utf-8'):
    parts = line.rstrip('\r\n').split('\t')
    if parts[0] in users:
        rows.setdefault(parts[0], []).append((parts[1], int(float(parts[3]))))
def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {'content-type': 'application/json'})
    return json.load(urllib.request.urlopen(req))
for user in users:
    events = sorted(rows[user], key=lambda e: e[1])
    for i in range(0, len(events) - 1, 500):
        post('/v1/events', {'events': [{'user_id': user, 'item_id': it, 'timestamp': ts} for it, ts in events[i:min(i + 500, len(events) - 1)]]})
    had = {it for it, _ in events[:-1]}
    at = events[-1][1]
    for ex in (True, False):
        top = post('/v1/recommend', {'user_id': user, 'k': 10, 'at': at, 'exclude_seen': ex})['items']
        print(user, len(events), 'exclude_seen', ex, 'held in top 10:', sum(t['item_id'] in had for t in top), [t['item_id'][:25] for t in top[:3]])
