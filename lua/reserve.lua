-- reserve: read buckets and hold tokens (admit, lease; dirty reads).

-- {req, ref, pt, ct, rsv}, or nil if the bucket does not exist (seed writes
-- all five fields, so an existing bucket is never an empty hash).
local function load(k)
  local v = redis.call('HMGET', k, 'req', 'ref', 'pt', 'ct', 'rsv')
  if not (v[1] or v[2] or v[3] or v[4] or v[5]) then return nil end
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0, tonumber(v[5]) or 0}
end

local function committed(u)
  return u[3] + u[4] + u[5]
end

-- What a key may still take in both buckets (-1 = unlimited).
local function headroom(lim_day, lim_month, du, mu)
  local h = -1
  if lim_day >= 0 then h = math.max(lim_day - committed(du), 0) end
  if lim_month >= 0 then
    local m = math.max(lim_month - committed(mu), 0)
    if h < 0 or m < h then h = m end
  end
  return h
end

-- Record a reservation ("day|month|prompt|held|expires_ms", from strings);
-- the hash lives while any reservation does.
local function hold(id, day, month, prompt, held, expires, ttl_ms)
  redis.call('HSET', RESV, id, day .. '|' .. month .. '|' .. prompt .. '|' .. held .. '|' .. expires)
  redis.call('PEXPIRE', RESV, ttl_ms)
end
