-- Shared by the wrk workloads (loaded with dofile from the repository root, as scripts/load.sh runs).
users = tonumber(os.getenv("XSREC_USERS") or "10000")
items = tonumber(os.getenv("XSREC_ITEMS") or "1682")
headers = { ["Content-Type"] = "application/json" }
local rate = tonumber(os.getenv("XSREC_RATE_PER_CONN") or "0")

function setup(thread)
  thread:set("id", tostring(thread))
end

function init(args)
  math.randomseed(os.time() + tonumber(string.sub(id, -6), 16))
end

-- Fixed rate per connection (ms between requests) when XSREC_RATE_PER_CONN is set.
function delay()
  if rate > 0 then return 1000 / rate end
  return 0
end

function done(summary, latency, requests)
  local e = summary.errors
  -- requests counts every response, a 429 or 503 too; status counts those above 399.
  io.write(string.format("RESULT requests=%d seconds=%.3f status=%d errors=%d p50_us=%d p90_us=%d p99_us=%d\n",
    summary.requests, summary.duration / 1e6, e.status, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
