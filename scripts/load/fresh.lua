-- Fresh workload: one new event for a random user, then a recommendation for that same user.
-- Run with as many threads as connections so each connection strictly alternates the pair.
dofile("scripts/load/common.lua")
local sent = 0
local user = 0

function request()
  sent = sent + 1
  if sent % 2 == 1 then
    user = math.random(0, users - 1)
    -- Wall-clock seconds: every thread of every cell moves forward together, so a user's new
    -- event is their newest (a per-thread counter restarted each cell, sending most events
    -- of later cells into the middle of the histories the earlier ones had grown).
    local clock = os.time()
    local body = string.format('{"events":[{"user_id":"u%d","item_id":"%d","timestamp":%d}]}',
      user, math.random(1, items), clock)
    return wrk.format("POST", "/v1/events", headers, body)
  end
  return wrk.format("POST", "/v1/recommend", headers, string.format('{"user_id":"u%d","k":10}', user))
end
