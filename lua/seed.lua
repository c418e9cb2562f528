-- seed: put persisted totals in place if the bucket is missing.
-- ARGV[3] period (d|m), [4] name, [5..8] req ref pt ct, [9] ttl seconds.
local k = bucket_key(ARGV[3], ARGV[4])
if redis.call('EXISTS', k) == 1 then return 0 end
redis.call('HSET', k, 'req', ARGV[5], 'ref', ARGV[6], 'pt', ARGV[7], 'ct', ARGV[8], 'rsv', '0')
redis.call('EXPIRE', k, ARGV[9])
return 1
