#!/usr/bin/env python3
"""Asks one recommendation (k = 10) for each of USERS preloaded users, over CONNS kept-alive
connections, so that the static workload after it measures the steady state in which every
user's state is already computed and cached (as hours of static traffic would leave it)."""
import http.client
import sys
import threading
import urllib.parse

base, users, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
address = urllib.parse.urlsplit(base)
failures = []


def sweep(first):
    connection = http.client.HTTPConnection(address.hostname, address.port)
    for user in range(first, users, conns):
        body = f'{{"user_id":"u{user}","k":10}}'
        connection.request("POST", "/v1/recommend", body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            failures.append((user, reply.status))


threads = [threading.Thread(target=sweep, args=(first,)) for first in range(conns)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if failures:
    sys.exit(f"{len(failures)} warm-up recommendations failed, first: {failures[0]}")
