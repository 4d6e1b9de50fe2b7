-- refund.lua: Refund a hold — give it back, once.
--
-- KEYS[1]  the hold's hash
-- ARGV[1]  now (ms)   ARGV[2] retention of resolved holds (ms)   ARGV[3] ledger MAXLEN
-- ARGV[4]  reason   ARGV[5] n amounts, -1: everything   ARGV[6…] meter (escaped), amount pairs
-- Returns {'OK', state, n, meter, refunded × n, m, 13 MeterBalance figures × m} (flat, as
-- reserve.lua's) or {'ERR', code, field, msg}.
-- HELD: every take goes back to its bucket (amounts are ignored: a hold is all or nothing).
-- COMMITTED: credits back at most what was charged, in reverse burn order (debt first),
-- then the hold is REFUNDED. EXPIRED: nothing to give back. Repeats answer the first result.

local key = KEYS[1]
local now, retain, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reason, na = ARGV[4], tonumber(ARGV[5])

local h = hold_read(key)
if not h then return {'ERR', 'NOT_FOUND', 'reservation_id', 'no such reservation'} end
local ledger = h.pre .. 'ledger'

local amounts = nil
if na >= 0 then
  amounts = {}
  for j = 1, na do
    local m, a = ARGV[4 + 2 * j], tonumber(ARGV[5 + 2 * j])
    local found = false
    for i = 1, h.n do if h.m[i] == m then found = true end end
    if not found then
      return {'ERR', 'INVALID_ARGUMENT', 'amount', 'meter is not part of this reservation'}
    end
    amounts[m] = a
  end
end

local function answer(state)
  local out, bals = {}, {h.n}
  for i = 1, h.n do
    local ctx = hold_ctx(h, i, now, maxlen)
    local ws = chain_load(ctx)
    chain_save(ctx, ws)
    after_change(ctx, now, false)  -- a period rolled here is closed as on any call
    out[#out + 1] = h.m[i]
    out[#out + 1] = N(h.r[i])
    chain_view(ctx, ws, h.m[i], seat_room(ws, h.se, ctx.limit), ctx.pstart, ctx.pend, bals)
  end
  return put_all(put_pairs({'OK', HOLD_STATE[state]}, out), bals)
end

if h.st == 'H' and now >= tonumber(h.exp) then
  hold_release_all(h, key, now, 'E', ledger, maxlen, retain, 'expire')
  h.st = 'E'
end
if h.st == 'R' or h.st == 'E' then return answer(h.st) end

if h.st == 'H' then
  hold_release_all(h, key, now, 'R', ledger, maxlen, retain, 'release')
  local f = {'reason', reason}
  for i = 1, h.n do
    h.r[i] = h.g[i]
    f[#f + 1] = hf('r', i); f[#f + 1] = h.g[i]
  end
  redis.call('HSET', key, unpack(f))
  return answer('R')
end

-- COMMITTED: credit back in reverse burn order.
local fields = {'st', 'R', 'reason', reason, 'done', I(now)}
for i = 1, h.n do
  local c = N(h.c[i])
  local x = c
  if amounts then x = math.min(c, amounts[h.m[i]] or 0) end
  if x > 0 then
    local ctx = hold_ctx(h, i, now, maxlen)
    local ws = chain_load(ctx)
    -- The period the Commit counted this usage in (seat cap, overage): the one it was
    -- made in, also for a hold made in an earlier period. Only there is it given back.
    -- Recorded by the Commit ('cp'): the anchor day may have moved since. (A hold
    -- committed by an earlier build has none: the period of its Commit's day.)
    local cp = tonumber(h.hp[i])
    if h.k[i] ~= 'g' then
      if h.cp then cp = tonumber(h.cp)
      elseif h.done then
        cp = period_compute(floor(tonumber(h.done) / 86400000), math.max(1, N(ctx.anchor)))
      end
    end
    ctx.commit_pid = cp
    -- overage is credited at the price its Commit billed (a hold of an earlier build
    -- has none recorded: today's price)
    local op = h[hf('op', i)]
    if op then ctx.oprice = tonumber(op) end
    local takes = takes_in_burn_order(takes_decode(h.x[i]))
    local left, settled = x, 0
    for j = #takes, 1, -1 do
      local y = math.min(left, takes[j][3])
      settled = settled + credit_take(ctx, ws, takes[j], y)
      left = left - y
    end
    credit_settled(ctx, settled)
    if h.se ~= '' and ws[1].level == 'S' and ws[1].p == cp then
      ws[1].cu = math.max(0, ws[1].cu - x); ws[1].dirty = true
    end
    ctx.d = settle_debt(ctx.org, ctx.d)
    chain_save(ctx, ws)
    after_change(ctx, now, true)
    ledger_add(ledger, maxlen, {'type', 'refund', 'rid', h.rid, 'org', h.o, 'team', h.te,
      'seat', h.se, 'assistant', h.ae, 'meter', h.m[i], 'amount', I(x),
      'action', h.act, 'feature', h.feat, 'labels', h.lbl,
      'reason', reason, 'at', I(now)})
  end
  h.r[i] = I(x)
  fields[#fields + 1] = hf('r', i); fields[#fields + 1] = I(x)
end
redis.call('HSET', key, unpack(fields))
redis.call('PEXPIRE', key, retain)
return answer('R')
