-- Static workload: recommendations for random preloaded users whose history does not change.
dofile("scripts/load/common.lua")

function request()
  local body = string.format('{"user_id":"u%d","k":10}', math.random(0, users - 1))
  return wrk.format("POST", "/v1/recommend", headers, body)
end
