-- Static workload: recommendations for random preloaded users whose history does not change.
local users = tonumber(os.getenv("XSREC_USERS") or "10000")
local headers = { ["Content-Type"] = "application/json" }
local rate = tonumber(os.getenv("XSREC_RATE_PER_CONN") or "0")

function setup(thread)
  thread:set("id", tostring(thread))
end

function init(args)
  math.randomseed(os.time() + tonumber(string.sub(id, -6), 16))
end

function request()
  local body = string.format('{"user_id":"u%d","k":10}', math.random(0, users - 1))
  return wrk.format("POST", "/v1/recommend", headers, body)
end

-- Fixed rate per connection (ms between requests) when XSREC_RATE_PER_CONN is set.
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
