-- expire: charge the key's lapsed reservations (the flusher, once a round).
-- Every reservation is read, so this also catches any the expiry index
-- does not hold. Returns how many.
local all = redis.call('HGETALL', RESV)
local now, n = tonumber(ARGV[2]), 0
for i = 1, #all, 2 do
  local _, _, _, _, e = decode(all[i + 1])
  if tonumber(e) <= now then
    lapse(all[i], all[i + 1])
    n = n + 1
  end
end
return n
