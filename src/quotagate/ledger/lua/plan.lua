-- plan.lua: UpsertPlan's write of the plan hash, replaced whole in one step (a reader
-- never sees the old allowances mixed with the new ones).
--
-- KEYS[1]  the plan's hash        ARGV  field, value, field, value, …
-- Returns 1 when the plan is new, else 0.

local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1 - existed
