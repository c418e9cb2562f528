-- expire: charge the key's lapsed reservations what they held (the
-- flusher, once a round, in every replica). Admission does not look for
-- them: a lapsed reservation weighs the same against the limits as what
-- it is charged (its prompt as prompt, the rest as completion), so
-- charging it sooner would change no answer. Returns how many.
local all = redis.call('HGETALL', RESV)
local now, n = tonumber(ARGV[2]), 0
for i = 1, #all, 2 do
  local id, v = all[i], all[i + 1]
  local d, m, p, h, e = decode(v)
  if tonumber(e) <= now then
    local ct = tonumber(h) - tonumber(p)
    release(d, m, h, p, ct > 0 and num(ct) or '0', false)
    redis.call('HDEL', RESV, id)
    n = n + 1
  end
end
return n
