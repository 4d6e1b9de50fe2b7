-- reserve.lua: Reserve (hold tokens) and Check (the same decision, nothing held), in one
-- atomic step: every limit of every charge is checked before anything is written.
--
-- KEYS[1]  the org's configuration hash          KEYS[2]  idempotency record of the request
-- KEYS[3]  the new hold's hash                   KEYS[4]  the shard's expiry index (zset)
-- KEYS[5]  the shard's ledger stream             KEYS[5+i] balance hash of charge i's meter
-- ARGV[1]  now (ms, from the server's clock)     ARGV[2]  mode: 'R' reserve | 'C' check
-- ARGV[3]  reservation id for a new hold         ARGV[4]  hold TTL (ms)
-- ARGV[5]  allow_partial '1' | '0'               ARGV[6]  request fingerprint
-- ARGV[7]  retention of resolved holds and idempotency records (ms)
-- ARGV[8]  ledger stream MAXLEN (0: no cap)      ARGV[9]  shard key prefix
-- ARGV[10] team   ARGV[11] seat   ARGV[12] assistant   (escaped ids, '' when absent)
-- ARGV[13] feature ('' none)   ARGV[14] action   ARGV[15] labels (JSON)
-- ARGV[16] n charges, then for each: meter (escaped), kind ('c' | 'g'), amount
-- Returns {'OK', decision ('G' | 'D'), reason, silent (0|1), rid, expires_at,
--          {meter, amount, …} granted, {{MeterBalance fields…}, …}, replay (0|1)}
--      or {'ERR', code, field, message}.
-- Reasons: insufficient | seat | feature | ai | inactive | unknown | '' (granted).

local cfg, idem, hold_key, exp_key, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = tonumber(ARGV[1])
local mode, rid, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local allow_partial, fp = ARGV[5] == '1', ARGV[6]
local retain, maxlen, pre = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local te, se, ae = ARGV[10], ARGV[11], ARGV[12]
local feature, action, labels = ARGV[13], ARGV[14], ARGV[15]
local n = tonumber(ARGV[16])
local charges = {}
for i = 1, n do
  local b = 16 + (i - 1) * 3
  charges[i] = {meter = ARGV[b + 1], kind = ARGV[b + 2], amount = tonumber(ARGV[b + 3]),
    bal = KEYS[5 + i]}
end

-- Holds of this shard whose TTL passed are released first, so they never block a grant.
sweep_shard(pre, now, 4, ledger, maxlen, retain)

local anchor = 1

local function contexts()
  local out = {}
  for i = 1, n do
    local c = charges[i]
    local ctx = {cfg = cfg, bal = c.bal, te = te, se = se, meter = c.meter, kind = c.kind}
    if c.kind == 'g' then
      ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
    else
      ctx.pid, ctx.pstart, ctx.pend = period_of(now, anchor)
    end
    out[i] = ctx
  end
  return out
end

local function views(ctxs, wss)
  local out = {}
  for i = 1, n do
    local ctx, ws = ctxs[i], wss[i]
    local room = seat_room(ws, se, seat_limit(cfg, se, ctx.meter, ctx))
    out[i] = chain_view(ctx, ws, ctx.meter, room, ctx.pstart, ctx.pend)
  end
  return out
end

-- A denial still reports the balances (the subject's wallets), when the subject exists.
local function deny(reason, silent, ctxs, wss)
  local bals = {}
  if ctxs then
    for i = 1, n do chain_save(ctxs[i], wss[i]); after_change(ctxs[i], now, false) end
    bals = views(ctxs, wss)
  end
  return {'OK', 'D', reason, silent and 1 or 0, '', 0, {}, bals, 0}
end

-- 0. A retry of a request already granted answers what it answered the first time.
if mode == 'R' then
  local prev = redis.call('GET', idem)
  if prev then
    local sep = string.find(prev, '|', 1, true)
    local prev_rid, prev_fp = string.sub(prev, 1, sep - 1), string.sub(prev, sep + 1)
    if prev_fp ~= fp then
      return {'ERR', 'INVALID_ARGUMENT', 'idempotency_key',
        'idempotency_key was already used for a different request'}
    end
    local h = hold_read(pre .. 'h:' .. prev_rid)
    if h then
      local granted = {}
      for i = 1, h.n do
        granted[#granted + 1] = h['m' .. i]; granted[#granted + 1] = h['g' .. i]
      end
      anchor = math.max(1, N(redis.call('HGET', cfg, 'anchor')))
      local ctxs, wss = contexts(), {}
      for i = 1, n do wss[i] = chain_load(ctxs[i]) end
      return {'OK', 'G', '', 0, prev_rid, tonumber(h.exp), granted, views(ctxs, wss), 1}
    end
  end
end

-- 1. The org exists, AI is on, the feature is on for the org and the team.
local o = redis.call('HMGET', cfg, 'anchor', 'ai')
if o[1] == false then return deny('unknown', false) end
anchor = math.max(1, N(o[1]))
if o[2] ~= '1' then return deny('ai', false) end

-- Resolve the team: given, else the seat's, else the assistant's.
if se ~= '' then
  local st = redis.call('HGET', cfg, 's:' .. se)
  if st == false then return deny('unknown', false) end
  if te == '' then te = st elseif st ~= te then return deny('unknown', false) end
end
local a_enabled = nil
if ae ~= '' then
  local a = redis.call('HMGET', cfg, 'as:' .. ae, 'at:' .. ae)
  if a[1] == false then return deny('unknown', false) end
  a_enabled = (a[1] == '1')
  if te == '' and a[2] then te = a[2] end
end
if te ~= '' and redis.call('HEXISTS', cfg, 't:' .. te) == 0 then return deny('unknown', false) end

if feature ~= '' then
  local f = redis.call('HMGET', cfg, 'f:' .. feature, 'tf:' .. te .. ':' .. feature)
  if f[1] == '0' or (te ~= '' and f[2] == '0') then return deny('feature', false) end
end

local ctxs, wss = contexts(), {}
for i = 1, n do wss[i] = chain_load(ctxs[i]) end

-- 2. The assistant is enabled and the wallet it draws on can still pay.
if ae ~= '' then
  if not a_enabled then return deny('inactive', true, ctxs, wss) end
  for i = 1, n do
    if chain_available(ctxs[i], wss[i]) <= 0 then
      -- The wallet it draws on ran dry: hide it (silent) and tell the owner, once.
      assistant_deactivate(ctxs[i], ae, 'exhausted', now)
      return deny('inactive', true, ctxs, wss)
    end
  end
end

-- 3 and 4. Seat cap, then the buckets: every charge fits, or nothing is taken.
local grants, binding = {}, ''
for i = 1, n do
  local want = charges[i].amount
  local room = seat_room(wss[i], se, seat_limit(cfg, se, charges[i].meter, ctxs[i]))
  local avail = chain_available(ctxs[i], wss[i])
  local can = avail
  local why = 'insufficient'
  if room >= 0 and room < avail then can = room; why = 'seat' end
  if can >= want then
    grants[i] = want
  elseif allow_partial and n == 1 and can > 0 then
    grants[i] = can
  else
    if why ~= 'seat' and redis.call('HEXISTS', cfg, 'oc:' .. charges[i].meter) == 1 then
      why = 'overage'
    end
    return deny(why, false, ctxs, wss)
  end
end

if ae ~= '' then
  for i = 1, n do assistant_reactivate(ctxs[i], ae, now) end
end

if mode == 'C' then
  for i = 1, n do chain_save(ctxs[i], wss[i]); after_change(ctxs[i], now, false) end
  return {'OK', 'G', '', 0, '', 0, {}, views(ctxs, wss), 0}
end

-- Hold: take each grant in burn order and record exactly what came from where.
local expires = now + ttl
local org_e = string.sub(cfg, #pre + 5)
-- Only what cannot be derived (hold_read rebuilds rid, pre, cfg and the balance keys),
-- and no empty ids: a smaller hash to write, to read back and to append to the AOF.
local fields = {'st', 'H', 'o', org_e, 'n', I(n), 'exp', I(expires), 'at', I(now)}
local optional = {'te', te, 'se', se, 'ae', ae, 'act', action, 'feat', feature,
  'lbl', labels}
for j = 1, #optional, 2 do
  if optional[j + 1] ~= '' then
    fields[#fields + 1] = optional[j]; fields[#fields + 1] = optional[j + 1]
  end
end
local granted = {}
for i = 1, n do
  local takes = chain_hold(ctxs[i], wss[i], grants[i])
  if se ~= '' then wss[i][1].ch = wss[i][1].ch + grants[i]; wss[i][1].dirty = true end
  chain_save(ctxs[i], wss[i])
  after_change(ctxs[i], now, false)
  local t = takes_encode(takes)
  local sfx = I(i)
  local nf = #fields
  fields[nf + 1] = 'm' .. sfx; fields[nf + 2] = charges[i].meter
  fields[nf + 3] = 'k' .. sfx; fields[nf + 4] = charges[i].kind
  fields[nf + 5] = 'g' .. sfx; fields[nf + 6] = I(grants[i])
  fields[nf + 7] = 't' .. sfx; fields[nf + 8] = t
  fields[nf + 9] = 'hp' .. sfx; fields[nf + 10] = I(ctxs[i].pid)
  granted[#granted + 1] = charges[i].meter; granted[#granted + 1] = grants[i]
  ledger_add(ledger, maxlen, {'type', 'reserve', 'rid', rid, 'org', org_e, 'team', te,
    'seat', se, 'assistant', ae, 'meter', charges[i].meter, 'amount', I(grants[i]),
    'takes', t, 'action', action, 'feature', feature, 'labels', labels, 'at', I(now)})
end
redis.call('HSET', hold_key, unpack(fields))
redis.call('ZADD', exp_key, I(expires), rid)
redis.call('SET', idem, rid .. '|' .. fp, 'PX', ttl + retain)
return {'OK', 'G', '', 0, rid, expires, granted, views(ctxs, wss), 0}
