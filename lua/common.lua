-- llm-quota quota scripts, version 1: the part every script starts with.
-- A script is this file, then the parts it uses, in this order:
-- release.lua, reserve.lua, then its own file
-- (src/quota/redis.rs puts them together). Redis runs a script's whole text
-- on every call, and each helper defined is a closure made and collected
-- again (some 0.8 k instructions), so a script takes only the parts it uses.
-- Every key a script touches carries the API key's hash tag ("<prefix>:{<id>}"),
-- so a script stays within one slot (Redis Cluster safe).
-- ARGV[1] = "<prefix>:{<key id>}", ARGV[2] = now (unix ms; 0 for every
-- script but expire, the only one that looks for lapsed reservations).
-- A bucket is a hash: req (admissions), ref (refunds), pt / ct (charged
-- prompt / completion tokens), rsv (held by in-flight requests).
-- Counts that arrive as strings (arguments, a reservation's fields) go back
-- to Redis as those strings: a Lua number passed to redis.call is formatted
-- with snprintf, about 2 k instructions each.
local base = ARGV[1]
local RESV = base .. ':resv'
local DIRTY = base .. ':dirty'

local function bucket_key(period, name)
  return base .. ':' .. period .. ':' .. name
end

-- A whole number as a decimal string: '%d' (an integer conversion) takes
-- about half of what '%.0f' or redis.call's own formatting of a number takes.
local function num(x)
  return string.format('%d', x)
end

-- A reservation is "day|month|prompt|held|expires_ms"; its fields, as strings.
local function decode(v)
  return string.match(v, '^([^|]*)|([^|]*)|(%d+)|(%d+)|(%-?%d+)$')
end
