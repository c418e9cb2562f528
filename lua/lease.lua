-- lease: ARGV[3] reservation id, [4] tokens wanted, [5] new expires_ms,
-- [6] day token limit, [7] month token limit (-1 = unlimited),
-- [8] reservation hash ttl ms. Returns the tokens granted.
local v = redis.call('HGET', RESV, ARGV[3])
if not v then return 0 end
local d, m, p, h = decode(v)
local want, lim_dt, lim_mt = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
local dk, mk = bucket_key('d', d), bucket_key('m', m)
local du, mu = load(dk), load(mk)
local room = headroom(lim_dt, lim_mt, du or {0, 0, 0, 0, 0}, mu or {0, 0, 0, 0, 0})
local granted = want
if room >= 0 then granted = math.min(want, room) end
if granted > 0 then
  for k in pairs({[dk] = du, [mk] = mu}) do
    redis.call('HINCRBY', k, 'rsv', granted)
  end
end
hold(ARGV[3], d, m, p, num(tonumber(h) + granted), ARGV[5], ARGV[8])
return granted
