-- release: give a reservation back and charge instead (settle, expire).
-- held, pt, ct are whole numbers as decimal strings. A bucket that is gone
-- (expired long after its period) is left alone. Returns the dirty-set
-- member of the bucket, or nil.
local function release_one(period, name, neg_held, pt, ct, refund)
  local k = bucket_key(period, name)
  if redis.call('EXISTS', k) == 0 then return nil end
  if redis.call('HINCRBY', k, 'rsv', neg_held) < 0 then redis.call('HSET', k, 'rsv', '0') end
  if pt ~= '0' then redis.call('HINCRBY', k, 'pt', pt) end
  if ct ~= '0' then redis.call('HINCRBY', k, 'ct', ct) end
  if refund then redis.call('HINCRBY', k, 'ref', '1') end
  return period .. '|' .. name
end

local function release(day, month, held, pt, ct, refund)
  -- "0", not "-0", which HINCRBY refuses: a reservation may hold nothing.
  local neg_held = held == '0' and '0' or '-' .. held
  local d = release_one('d', day, neg_held, pt, ct, refund)
  local m = release_one('m', month, neg_held, pt, ct, refund)
  -- Both buckets marked changed in one call.
  if d and m then
    redis.call('SADD', DIRTY, d, m)
  elseif d or m then
    redis.call('SADD', DIRTY, d or m)
  end
end
