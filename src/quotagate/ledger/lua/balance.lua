-- balance.lua: GetBalance — the MeterBalance of a subject for each meter asked.
--
-- KEYS[1]  the org's configuration hash   KEYS[2] the shard's expiry index (zset)
-- KEYS[3]  the shard's ledger stream       KEYS[3+i] balance hash of meter i
-- ARGV[1]  now (ms)   ARGV[2] team   ARGV[3] seat   ARGV[4] assistant (escaped, '' none)
-- ARGV[5]  retention of resolved holds (ms)   ARGV[6] ledger MAXLEN   ARGV[7] shard prefix
-- ARGV[8]  n meters, then for each: meter (escaped), kind ('c' | 'g')
-- Returns {'OK', n, 13 MeterBalance figures × n} (flat) or {'ERR', code, field, msg}.
-- Touching a wallet in a new period resets its monthly figures (the lazy reset). Holds
-- past their TTL (up to 8 of the shard's) are released first, as a Reserve they would
-- block releases them: what is reported as remaining is what a Reserve would get.

local cfg = KEYS[1]
local now, te, se, ae = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[8])
local anchor = redis.call('HGET', cfg, 'anchor')
if anchor == false then return {'ERR', 'NOT_FOUND', 'subject.org_id', 'no such org'} end
anchor = math.max(1, tonumber(anchor))
if se ~= '' then
  local st = redis.call('HGET', cfg, 's:' .. se)
  if st == false then return {'ERR', 'NOT_FOUND', 'subject.seat_id', 'no such seat'} end
  if te ~= '' and st ~= te then
    return {'ERR', 'INVALID_ARGUMENT', 'subject.team_id', 'the seat is not in this team'}
  end
  te = st
end
if ae ~= '' and te == '' then
  local at = redis.call('HGET', cfg, 'at:' .. ae)
  if at then te = at end
end
if te ~= '' and redis.call('HEXISTS', cfg, 't:' .. te) == 0 then
  return {'ERR', 'NOT_FOUND', 'subject.team_id', 'no such team'}
end
sweep_shard(ARGV[7], now, 8, KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[5]))
local out = {'OK', n}
for i = 1, n do
  local meter, kind = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local ctx = {cfg = cfg, bal = KEYS[3 + i], te = te, se = se, meter = meter, kind = kind}
  if kind == 'g' then
    ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
  else
    ctx.pid, ctx.pstart, ctx.pend = period_of(now, anchor)
  end
  local ws = chain_load(ctx)
  chain_save(ctx, ws)
  after_change(ctx, now, false)
  chain_view(ctx, ws, meter, seat_room(ws, se, ctx.limit), ctx.pstart, ctx.pend, out)
end
return out
