-- dirty: hand out the key's changed buckets with their totals, once.
-- Returns {period, name, req, ref, pt, ct, rsv, ...}.
local out = {}
for _, member in ipairs(redis.call('SPOP', DIRTY, 1000)) do
  local period, name = string.match(member, '^(%a)|(.+)$')
  local k = bucket_key(period, name)
  local u = load(k)
  if u then
    table.insert(out, period)
    table.insert(out, name)
    for i = 1, 5 do table.insert(out, u[i]) end
  end
end
return out
