-- sweep: charge lapsed reservations what they held (admit, expire).
local now = tonumber(ARGV[2])

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
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', RESVX, '-inf', now, 'LIMIT', 0, 256)) do
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

-- Every reservation read (the flusher, once a round): also catches any
-- the index does not hold.
local function sweep_all()
  local all = redis.call('HGETALL', RESV)
  local n = 0
  for i = 1, #all, 2 do
    local _, _, _, _, e = decode(all[i + 1])
    if tonumber(e) <= now then
      lapse(all[i], all[i + 1])
      n = n + 1
    end
  end
  return n
end
