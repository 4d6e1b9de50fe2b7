-- sweep.lua: expire holds of one shard whose TTL has passed (the sweeper's step).
--
-- KEYS[1]  the shard's expiry index (zset: reservation id -> expiry ms)
-- ARGV[1]  now (ms)   ARGV[2] at most this many holds   ARGV[3] retention (ms)
-- ARGV[4]  ledger MAXLEN   ARGV[5] the shard's key prefix
-- Then closes the overage periods of the shard that ended untouched (close_periods).
-- Returns the number of holds and periods looked at.
local n = sweep_shard(ARGV[5], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[5] .. 'ledger',
  tonumber(ARGV[4]), tonumber(ARGV[3]))
return n + close_periods(ARGV[5], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]))
