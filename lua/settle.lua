-- settle: ARGV[3] reservation id, [4] prompt tokens, [5] completion
-- tokens, [6] refund (1/0). Returns 1, or 0 if the reservation had lapsed
-- (it was charged what it held; nothing changes).
local v = redis.call('HGET', RESV, ARGV[3])
if not v then return 0 end
local d, m, _, h = decode(v)
release(d, m, h, ARGV[4], ARGV[5], ARGV[6] == '1')
redis.call('HDEL', RESV, ARGV[3])
return 1
