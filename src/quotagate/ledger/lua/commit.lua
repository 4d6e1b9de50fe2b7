-- commit.lua: Commit a hold — charge what was really used, once.
--
-- KEYS[1]  the hold's hash
-- ARGV[1]  now (ms)   ARGV[2] retention of resolved holds (ms)   ARGV[3] ledger MAXLEN
-- ARGV[4]  labels (JSON, '' none)   ARGV[5] n actual charges, -1: charge what was held
-- ARGV[6…] meter (escaped), amount pairs
-- Returns {'OK', state, n, meter, charged × n, m, 13 MeterBalance figures × m} (flat, as
-- reserve.lua's) or {'ERR', code, field, msg}.
-- Less than held: the rest goes back to the buckets it came from. More than held: the
-- excess is charged from what is available, the remainder becomes debt (usage is never
-- dropped). A hold past its TTL is expired first; a late Commit still records the usage.
-- Repeats answer the first result; a Commit after Refund charges nothing.

local key = KEYS[1]
local now, retain, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local labels, na = ARGV[4], tonumber(ARGV[5])

local h = hold_read(key)
if not h then return {'ERR', 'NOT_FOUND', 'reservation_id', 'no such reservation'} end
local ledger = h.pre .. 'ledger'

local actual = nil
if na >= 0 then
  actual = {}
  for j = 1, na do
    local m, a = ARGV[4 + 2 * j], tonumber(ARGV[5 + 2 * j])
    local found = false
    for i = 1, h.n do if h.m[i] == m then found = true end end
    if not found then
      return {'ERR', 'INVALID_ARGUMENT', 'actual', 'meter is not part of this reservation'}
    end
    actual[m] = a
  end
end

local function want(i)
  if not actual then return N(h.g[i]) end
  return actual[h.m[i]] or 0
end

local function answer(state)
  local out, bals = {}, {h.n}
  for i = 1, h.n do
    local ctx = hold_ctx(h, i, now, maxlen)
    local ws = chain_load(ctx)
    chain_save(ctx, ws)
    after_change(ctx, now, false)  -- a period rolled here is closed as on any call
    out[#out + 1] = h.m[i]
    out[#out + 1] = N(h.c[i])
    chain_view(ctx, ws, h.m[i], seat_room(ws, h.se, ctx.limit), ctx.pstart, ctx.pend, bals)
  end
  return put_all(put_pairs({'OK', HOLD_STATE[state]}, out), bals)
end

if h.st == 'H' and now >= tonumber(h.exp) then
  hold_release_all(h, key, now, 'E', ledger, maxlen, retain, 'expire')
  h.st = 'E'
end
if h.st == 'C' or h.st == 'R' then return answer(h.st) end

local late = (h.st == 'E')
local fields = {'st', 'C', 'done', I(now)}
local cp = nil  -- the period the usage is counted in (seat cap, overage), for a Refund
local out, bals = {}, {h.n}
for i = 1, h.n do
  local ctx = hold_ctx(h, i, now, maxlen)
  local ws = chain_load(ctx)
  local before = chain_available(ctx, ws)
  if h.k[i] ~= 'g' then cp = ctx.pid end
  local a = want(i)
  local charged = {}
  local left = a
  if not late then
    -- Charge the held takes in burn order; release whatever was not used.
    local takes = takes_decode(h.t[i])
    for j = 1, #takes do
      local x = math.min(left, takes[j][3])
      if x > 0 then
        charge_take(ctx, ws, takes[j], x)
        charged[#charged + 1] = {takes[j][1], takes[j][2], x}
        left = left - x
      end
      release_take(ws, takes[j], takes[j][3] - x)
    end
    seat_settle(ws, h, i, a)
  elseif h.se ~= '' and ws[1].level == 'S' then
    ws[1].cu = ws[1].cu + a; ws[1].dirty = true
  end
  if left > 0 then
    local extra = chain_charge_free(ctx, ws, left)
    charged = takes_merge(charged, extra)
  end
  chain_save(ctx, ws)
  local dry = chain_available(ctx, ws) <= 0
  -- Its last tokens went now: every assistant drawing on it is deactivated.
  if dry and before > 0 then ctx.dry = true end
  -- It used overage (overage_used set ctx.billed): the price it was billed at, which a
  -- Refund credits back whatever the price is by then.
  if ctx.billed ~= nil then
    fields[#fields + 1] = hf('op', i); fields[#fields + 1] = I(ctx.oprice)
  end
  after_change(ctx, now, a < N(h.g[i]))
  if h.ae ~= '' and dry then
    assistant_deactivate(ctx, h.ae, 'exhausted', now)
  end
  -- The answer's balances come from the wallets just saved: no second read.
  out[#out + 1] = h.m[i]; out[#out + 1] = a
  chain_view(ctx, ws, h.m[i], seat_room(ws, h.se, ctx.limit), ctx.pstart, ctx.pend, bals)
  local x = takes_encode(charged)
  h.c[i] = I(a)
  fields[#fields + 1] = hf('c', i); fields[#fields + 1] = I(a)
  fields[#fields + 1] = hf('x', i); fields[#fields + 1] = x
  spend_entry(ledger, maxlen, 'commit', h, h.m[i], a, x, late and '1' or '',
    (labels ~= '' and labels) or h.lbl, now, ctx.anchor)
end
if cp then fields[#fields + 1] = 'cp'; fields[#fields + 1] = I(cp) end
redis.call('HSET', key, unpack(fields))
-- A committed gauge charge (stored bytes) is given back by a Refund when the file is
-- deleted, maybe months later: keep such holds until then. Others expire after retention.
local gauge = false
for i = 1, h.n do if h.k[i] == 'g' then gauge = true end end
if gauge then redis.call('PERSIST', key) else redis.call('PEXPIRE', key, retain) end
redis.call('ZREM', h.pre .. 'exp', h.rid)
return put_all(put_pairs({'OK', HOLD_STATE['C']}, out), bals)
