-- llm-quota quota scripts, version 1: shared part, prepended to each script.
-- Every key a script touches carries the API key's hash tag ("<prefix>:{<id>}"),
-- so a script stays within one slot (Redis Cluster safe).
-- ARGV[1] = "<prefix>:{<key id>}", ARGV[2] = now (unix ms; 0 for scripts that
-- do not sweep lapsed reservations: lease, settle, seed, dirty).
-- A bucket is a hash: req (admissions), ref (refunds), pt / ct (charged
-- prompt / completion tokens), rsv (held by in-flight requests).
local base = ARGV[1]
local now = tonumber(ARGV[2])
local RESV = base .. ':resv'
-- The same reservations by expiry (score = expires_ms): the lapsed ones are
-- found without reading them all.
local RESVX = base .. ':resvx'
local DIRTY = base .. ':dirty'

local function bucket_key(period, name)
  return base .. ':' .. period .. ':' .. name
end

local function num(x)
  return string.format('%.0f', x)
end

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

-- a reservation: "day|month|prompt|held|expires_ms"
local function decode(v)
  local d, m, p, h, e = string.match(v, '^([^|]*)|([^|]*)|(%d+)|(%d+)|(%-?%d+)$')
  return d, m, tonumber(p), tonumber(h), tonumber(e)
end

local function encode(d, m, p, h, e)
  return d .. '|' .. m .. '|' .. num(p) .. '|' .. num(h) .. '|' .. num(e)
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

-- Release a reservation from its buckets and charge instead. A bucket that
-- is gone (expired long after its period) is left alone.
local function release(day, month, held, pt, ct, refund)
  for _, pk in ipairs({{'d', day}, {'m', month}}) do
    local k = bucket_key(pk[1], pk[2])
    if redis.call('EXISTS', k) == 1 then
      -- 0 - held, not -held: Lua's -0 goes out as "-0", which HINCRBY
      -- refuses, and a reservation may hold nothing.
      if redis.call('HINCRBY', k, 'rsv', 0 - held) < 0 then redis.call('HSET', k, 'rsv', 0) end
      if pt > 0 then redis.call('HINCRBY', k, 'pt', pt) end
      if ct > 0 then redis.call('HINCRBY', k, 'ct', ct) end
      if refund then redis.call('HINCRBY', k, 'ref', 1) end
      redis.call('SADD', DIRTY, pk[1] .. '|' .. pk[2])
    end
  end
end

-- Lapsed reservations are charged what they held.
local function lapse(id, v)
  local d, m, p, h = decode(v)
  release(d, m, h, p, h - p, false)
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
    if e <= now then
      lapse(all[i], all[i + 1])
      n = n + 1
    end
  end
  return n
end

-- Record a reservation and its expiry; both keys live while any does.
local function hold(id, v, expires, ttl_ms)
  redis.call('HSET', RESV, id, v)
  redis.call('ZADD', RESVX, expires, id)
  redis.call('PEXPIRE', RESV, ttl_ms)
  redis.call('PEXPIRE', RESVX, ttl_ms)
end
