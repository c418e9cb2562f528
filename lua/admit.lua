-- admit: ARGV[3] reservation id, [4] day, [5] month, [6] prompt, [7] lease,
-- [8] expires_ms, [9..12] limits day-req, month-req, day-tok, month-tok
-- (-1 = unlimited), [13] reservation hash ttl ms.
-- Returns {0, day missing, month missing} | {1, limit 1..4, day[5], month[5]}
--       | {2, held, day[5], month[5]}.
local id, day, month = ARGV[3], ARGV[4], ARGV[5]
local prompt, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
-- An unlimited limit ('-1') is not converted.
local function limit(i)
  local v = ARGV[i]
  if v == '-1' then return -1 end
  return tonumber(v)
end
local lim_dr, lim_mr, lim_dt, lim_mt = limit(9), limit(10), limit(11), limit(12)
local dk, mk = bucket_key('d', day), bucket_key('m', month)
local du, mu = load(dk), load(mk)
if not (du and mu) then return {0, du and 0 or 1, mu and 0 or 1} end
local broken = 0
if lim_dr >= 0 and du[1] - du[2] + 1 > lim_dr then broken = 1
elseif lim_mr >= 0 and mu[1] - mu[2] + 1 > lim_mr then broken = 2
elseif lim_dt >= 0 and committed(du) + prompt > lim_dt then broken = 3
elseif lim_mt >= 0 and committed(mu) + prompt > lim_mt then broken = 4
end
if broken > 0 then
  return {1, broken, du[1], du[2], du[3], du[4], du[5], mu[1], mu[2], mu[3], mu[4], mu[5]}
end
local room = headroom(lim_dt, lim_mt, du, mu)
if room >= 0 then lease = math.min(lease, room - prompt) end
local held = prompt + lease
-- One write per bucket, not an HINCRBY per field (the script runs alone,
-- so the sums are the same; counts stay far below 2^53, where Lua's
-- numbers are exact, and `num` writes them as whole numbers).
du[1], du[5] = du[1] + 1, du[5] + held
mu[1], mu[5] = mu[1] + 1, mu[5] + held
redis.call('HSET', dk, 'req', num(du[1]), 'rsv', num(du[5]))
redis.call('HSET', mk, 'req', num(mu[1]), 'rsv', num(mu[5]))
redis.call('SADD', DIRTY, 'd|' .. day, 'm|' .. month)
hold(id, day, month, ARGV[6], num(held), ARGV[8], ARGV[13])
return {2, held, du[1], du[2], du[3], du[4], du[5], mu[1], mu[2], mu[3], mu[4], mu[5]}
