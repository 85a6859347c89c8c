-- Fresh workload: one new event for a random user, then a recommendation for that same user.
-- Run with as many threads as connections so each connection strictly alternates the pair.
local users = tonumber(os.getenv("XSREC_USERS") or "10000")
local items = tonumber(os.getenv("XSREC_ITEMS") or "1682")
local headers = { ["Content-Type"] = "application/json" }
local rate = tonumber(os.getenv("XSREC_RATE_PER_CONN") or "0")
local sent = 0
local user = 0
local clock = 1900000000

function setup(thread)
  thread:set("id", tostring(thread))
end

function init(args)
  math.randomseed(os.time() + tonumber(string.sub(id, -6), 16))
end

function request()
  sent = sent + 1
  if sent % 2 == 1 then
    user = math.random(0, users - 1)
    clock = clock + 60
    local body = string.format('{"events":[{"user_id":"u%d","item_id":"%d","timestamp":%d}]}',
      user, math.random(1, items), clock)
    return wrk.format("POST", "/v1/events", headers, body)
  end
  return wrk.format("POST", "/v1/recommend", headers, string.format('{"user_id":"u%d","k":10}', user))
end

function delay()
  if rate > 0 then return 1000 / rate end
  return 0
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d seconds=%.3f errors=%d p50_us=%d p90_us=%d p99_us=%d\n",
    summary.requests, summary.duration / 1e6,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
