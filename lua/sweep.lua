-- sweep: charge lapsed reservations what they held (admit; expire uses lapse).
-- ARGV[2] is now (unix ms).

local function lapse(id, v)
  local d, m, p, h = decode(v)
  local ct = tonumber(h) - tonumber(p)
  release(d, m, h, p, ct > 0 and num(ct) or '0', false)
  redis.call('HDEL', RESV, id)
  redis.call('ZREM', RESVX, id)
end

-- The lapsed ones by the expiry index, at most 256 a call: O(log n) for
-- an admission however many requests are in flight.
local function sweep()
  local n = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', RESVX, '-inf', ARGV[2], 'LIMIT', '0', '256')) do
    local v = redis.call('HGET', RESV, id)
    if v then
      lapse(id, v)
      n = n + 1
    else
      redis.call('ZREM', RESVX, id)
    end
  end
  return n
end
