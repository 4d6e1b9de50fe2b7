-- topup.lua: TopUp — add purchased tokens (they never expire) to an org, team or seat
-- wallet, once per purchase id. Org debt is paid first.
--
-- KEYS[1]  the org's configuration hash   KEYS[2] balance hash of the meter
-- KEYS[3]  the org's applied purchases (hash: purchase id -> what it bought)
-- KEYS[4]  the shard's ledger stream
-- ARGV[1]  now (ms)   ARGV[2] purchase id (escaped)   ARGV[3] amount
-- ARGV[4]  team   ARGV[5] seat (escaped, '' = the org wallet)   ARGV[6] meter (escaped)
-- ARGV[7]  kind ('c' | 'g')   ARGV[8] ledger MAXLEN   ARGV[9] org (escaped)
-- Returns {'OK', applied (1 | 0 for a repeat), {MeterBalance…}} or {'ERR', code, field, msg}.

local cfg, bal, purchases, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, pid_e, amount = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local te, se, meter, kind, maxlen = ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])

local anchor = redis.call('HGET', cfg, 'anchor')
if anchor == false then return {'ERR', 'NOT_FOUND', 'org_id', 'no such org'} end
-- A repeat is known by the purchase as it was asked for (meter, amount, team as given,
-- seat), recorded with the team it went to: a retry after the seat moved to another team
-- is the same purchase, answered with the balances of the seat's team now.
local prev = redis.call('HGET', purchases, pid_e)
local repeat_of = false
if prev then
  local pm, pa, pt, ps = string.match(prev, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  -- (a seat's team may be left out, or be the one it had; a team's must be the same)
  if not (pm == meter and pa == I(amount) and ps == se
      and (te == pt or (se ~= '' and te == ''))) then
    return {'ERR', 'INVALID_ARGUMENT', 'purchase_id', 'purchase_id was already used for a different top-up'}
  end
  repeat_of = prev
end
if se ~= '' then
  local st = redis.call('HGET', cfg, 's:' .. se)
  if st == false then return {'ERR', 'NOT_FOUND', 'seat_id', 'no such seat'} end
  if te ~= '' and st ~= te and not repeat_of then
    return {'ERR', 'INVALID_ARGUMENT', 'team_id', 'the seat is not in this team'}
  end
  te = st
end
if te ~= '' and redis.call('HEXISTS', cfg, 't:' .. te) == 0 then
  return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'}
end

local ctx = {cfg = cfg, bal = bal, te = te, se = se, meter = meter, kind = kind,
  maxlen = maxlen}
if kind == 'g' then
  ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
else
  ctx.pid, ctx.pstart, ctx.pend = period_of(now, math.max(1, tonumber(anchor)))
end
local what = meter .. '|' .. I(amount) .. '|' .. te .. '|' .. se
local applied = 0
local ws = chain_load(ctx)
if not repeat_of then
  local w = ws[1]
  w.tb = w.tb + amount; w.dirty = true
  ctx.d = settle_debt(ctx.org, ctx.d)
  redis.call('HSET', purchases, pid_e, what)
  applied = 1
  ledger_add(ledger, maxlen, {'type', 'topup', 'org', ARGV[9], 'team', te,
    'seat', se, 'meter', meter, 'amount', I(amount), 'purchase', pid_e, 'at', I(now)})
end
chain_save(ctx, ws)
after_change(ctx, now, applied == 1)
local room = seat_room(ws, se, seat_limit(cfg, se, meter, ctx))
return {'OK', applied, chain_view(ctx, ws, meter, room, ctx.pstart, ctx.pend)}
