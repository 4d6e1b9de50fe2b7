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
-- Returns {'OK', decision ('G' | 'D'), reason, silent (0|1), rid, expires_at, replay (0|1),
--          n granted, then meter, amount × n, m balances, then 13 MeterBalance figures × m}
--      (flat: lib.lua's put_pairs, chain_view) or {'ERR', code, field, message}.
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

-- One context per charge: its chain's configuration (meter_cfg) from the HMGET reply v.
local function contexts(v, ks, anchor, seats, lowpct)
  local out = {}
  for i = 1, n do
    local c = charges[i]
    local ctx = {cfg = cfg, bal = c.bal, te = te, se = se, meter = c.meter, kind = c.kind,
      maxlen = maxlen, ae = (mode == 'R' and ae ~= '') and ae or nil}
    if c.kind == 'g' then
      ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
    else
      ctx.pid, ctx.pstart, ctx.pend = period_of(now, anchor)
    end
    meter_cfg(ctx, v, ks[i], seats, lowpct)
    out[i] = ctx
  end
  return out
end

local function load_all(ctxs)
  local wss = {}
  for i = 1, n do wss[i] = chain_load(ctxs[i]) end
  return wss
end

-- The balances of every charge, appended to the reply `out` (count, then figures).
local function views(ctxs, wss, out)
  out[#out + 1] = n
  for i = 1, n do
    local ctx, ws = ctxs[i], wss[i]
    chain_view(ctx, ws, ctx.meter, seat_room(ws, se, ctx.limit), ctx.pstart, ctx.pend, out)
  end
  return out
end

-- A denial still reports the balances (the subject's wallets), when the subject exists.
local function deny(reason, silent, ctxs, wss)
  local out = {'OK', 'D', reason, silent and 1 or 0, '', 0, 0, 0}
  if not ctxs then out[9] = 0; return out end
  for i = 1, n do
    ctxs[i].new_user = false  -- a refused call marks nothing: only a grant is a draw
    chain_save(ctxs[i], wss[i]); after_change(ctxs[i], now, false)
  end
  return views(ctxs, wss, out)
end

-- 0. A retry of a request already granted answers what it answered the first time
-- (whatever changed since: it is the same request).
local replay = nil
if mode == 'R' then
  local prev = redis.call('GET', idem)
  if prev then
    local sep = string.find(prev, '|', 1, true)
    local prev_rid, prev_fp = string.sub(prev, 1, sep - 1), string.sub(prev, sep + 1)
    if prev_fp ~= fp then
      return {'ERR', 'INVALID_ARGUMENT', 'idempotency_key',
        'idempotency_key was already used for a different request'}
    end
    replay = hold_read(pre .. 'h:' .. prev_rid)
    if replay then replay.rid = prev_rid end
  end
end
local function replayed(ctxs)
  local h, granted = replay, {}
  for i = 1, h.n do
    granted[#granted + 1] = h.m[i]; granted[#granted + 1] = h.g[i]
  end
  local out = put_pairs({'OK', 'G', '', 0, h.rid, tonumber(h.exp), 1}, granted)
  if not ctxs then out[#out + 1] = 0; return out end
  return views(ctxs, load_all(ctxs), out)
end

-- The org's configuration this request needs, in one HMGET: the org's own fields, the
-- seat's and assistant's registration, the team, the feature switches and every charge's
-- meter_fields. When the team is not given but follows from the seat or the assistant,
-- a first HMGET finds it and a second reads what depends on it.
local head = {'anchor', 'ai', 'seats', 'lowpct'}
local i_s, i_as, i_at
if se ~= '' then head[#head + 1] = 's:' .. se; i_s = #head end
if ae ~= '' then
  head[#head + 1] = 'as:' .. ae; i_as = #head
  head[#head + 1] = 'at:' .. ae; i_at = #head
end
local derive = (te == '' and (se ~= '' or ae ~= ''))

-- 1. The org exists, AI is on; the seat, assistant and team are known.
local function org_checks(o)
  if o[1] == false then return 'unknown' end
  if o[2] ~= '1' then return 'ai' end
  if se ~= '' then
    local st = o[i_s]
    if st == false then return 'unknown' end
    if te == '' then te = st elseif st ~= te then return 'unknown' end
  end
  if ae ~= '' then
    if o[i_as] == false then return 'unknown' end
    if te == '' and o[i_at] then te = o[i_at] end
  end
  return nil
end

local o, names
if derive then
  o = redis.call('HMGET', cfg, unpack(head))
  local why = org_checks(o)
  if why then
    if replay then return replayed(nil) end
    return deny(why, false)
  end
  names = {}
else
  names = head
end
local i_t, i_f, i_tf
if te ~= '' then names[#names + 1] = 't:' .. te; i_t = #names end
if feature ~= '' then
  names[#names + 1] = 'f:' .. feature; i_f = #names
  if te ~= '' then names[#names + 1] = 'tf:' .. te .. ':' .. feature; i_tf = #names end
end
local ks = {}
for i = 1, n do ks[i] = meter_fields(names, charges[i].meter, te, se) end
local v = redis.call('HMGET', cfg, unpack(names))
local why = nil
if not derive then
  o = v
  why = org_checks(o)
end
if not why and te ~= '' and v[i_t] == false then why = 'unknown' end
if why then
  if replay then return replayed(nil) end
  return deny(why, false)
end
local anchor = math.max(1, N(o[1]))
local ctxs = contexts(v, ks, anchor, N(o[3]), o[4])
if replay then return replayed(ctxs) end
-- The feature is on for the org and the team (the subject is known: its balances are sent).
if feature ~= '' and (v[i_f] == '0' or (te ~= '' and v[i_tf] == '0')) then
  return deny('feature', false, ctxs, load_all(ctxs))
end

-- 2-4, decided before anything is written: the assistant is enabled and the wallet it
-- draws on can still pay; the seat cap, then the buckets: every charge fits (or, with
-- allow_partial, what is left of a single one), or nothing is taken. Returns nil and the
-- grants, or the reason of the denial and, for a dry wallet, the charge that found it.
local a_enabled = (ae == '') or (o[i_as] == '1')
local function decide(wss)
  if not a_enabled then return 'inactive' end
  if ae ~= '' then
    for i = 1, n do
      if not QUIET[ctxs[i].meter] and chain_available(ctxs[i], wss[i]) <= 0 then
        return 'exhausted', i
      end
    end
  end
  local grants = {}
  for i = 1, n do
    local want = charges[i].amount
    local room = seat_room(wss[i], se, ctxs[i].limit)
    local can = chain_available(ctxs[i], wss[i])
    ctxs[i].avail = can  -- what the chain has before the hold (a crossing to 0 is seen)
    local why = 'insufficient'
    if room >= 0 and room < can then can = room; why = 'seat' end
    if can >= want then
      grants[i] = want
    elseif allow_partial and n == 1 and can > 0 then
      grants[i] = can
      return 'partial', grants
    else
      if why ~= 'seat' and ctxs[i].ohas then why = 'overage' end
      return why
    end
  end
  return nil, grants
end

-- Check reports what a Reserve would get: holds past their TTL go back first.
if mode == 'C' then sweep_shard(pre, now, 8, ledger, maxlen, retain) end
local wss = load_all(ctxs)
local grants
why, grants = decide(wss)
-- Holds past their TTL are released before a denial (or a partial grant) stands, so they
-- never block a grant; a request that fits does not wait for them (the sweeper's job).
if why and why ~= 'inactive' and sweep_shard(pre, now, 8, ledger, maxlen, retain) > 0 then
  wss = load_all(ctxs)
  why, grants = decide(wss)
end
if why == 'exhausted' then
  -- The wallet it draws on ran dry: hide it (silent) and tell the owner, once. The first
  -- to find it so (no crossing was seen) has every other assistant on it looked at too.
  local c = ctxs[grants]
  if assistant_deactivate(c, ae, 'exhausted', now) then c.dry = true end
  return deny('inactive', true, ctxs, wss)
end
if why == 'inactive' then return deny('inactive', true, ctxs, wss) end
if why and why ~= 'partial' then return deny(why, false, ctxs, wss) end

if ae ~= '' then
  for i = 1, n do assistant_reactivate(ctxs[i], ae, now) end
end

if mode == 'C' then
  for i = 1, n do chain_save(ctxs[i], wss[i]); after_change(ctxs[i], now, false) end
  return views(ctxs, wss, {'OK', 'G', '', 0, '', 0, 0, 0})
end

-- Hold: take each grant in burn order and record exactly what came from where.
local expires = now + ttl
local org_e = string.sub(cfg, #pre + 5)
-- Only what cannot be derived (hold_read rebuilds rid, pre, cfg and the balance keys),
-- and no empty ids: a smaller hash to write, to read back and to append to the AOF.
-- (Numbers as I() strings: Redis would format a number argument with %.17g, slower.)
local fields = {'st', 'H', 'o', org_e, 'n', I(n), 'exp', I(expires), 'at', I(now)}
-- the request's ids, as spend_entry reads them from a hold
local who = {rid = rid, o = org_e, te = te, se = se, ae = ae, act = action, feat = feature}
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
  -- The hold takes the chain's last tokens: the assistants on it are deactivated.
  if ctxs[i].avail <= grants[i] then ctxs[i].dry = true end
  chain_save(ctxs[i], wss[i])
  after_change(ctxs[i], now, false)
  local t = takes_encode(takes)
  local nf = #fields
  fields[nf + 1] = hf('m', i); fields[nf + 2] = charges[i].meter
  fields[nf + 3] = hf('k', i); fields[nf + 4] = charges[i].kind
  fields[nf + 5] = hf('g', i); fields[nf + 6] = I(grants[i])
  fields[nf + 7] = hf('t', i); fields[nf + 8] = t
  fields[nf + 9] = hf('hp', i); fields[nf + 10] = I(ctxs[i].pid)
  granted[#granted + 1] = charges[i].meter; granted[#granted + 1] = grants[i]
  spend_entry(ledger, maxlen, 'reserve', who, charges[i].meter, grants[i], t, '', labels, now,
    o[1])
end
redis.call('HSET', hold_key, unpack(fields))
redis.call('ZADD', exp_key, I(expires), rid)
redis.call('SET', idem, rid .. '|' .. fp, 'PX', ttl + retain)
return views(ctxs, wss, put_pairs({'OK', 'G', '', 0, rid, expires, 0}, granted))
