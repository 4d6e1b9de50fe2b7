-- transfer.lua: Transfer (tokens between two wallets of one org) and Adjust (a hand
-- correction of the org wallet), each atomic and idempotent.
--
-- KEYS[1]  the org's configuration hash   KEYS[2] balance hash of the meter
-- KEYS[3]  idempotency record              KEYS[4] the shard's ledger stream
-- KEYS[5]  the shard's expiry index (zset)
-- ARGV[1]  op: transfer | adjust   ARGV[2] now (ms)   ARGV[3] meter (escaped)
-- ARGV[4]  kind ('c' | 'g')   ARGV[5] request fingerprint   ARGV[6] idempotency TTL (ms)
-- ARGV[7]  ledger MAXLEN      ARGV[8] retention of resolved holds (ms)
-- transfer: ARGV[9] from team  ARGV[10] from seat  ARGV[11] to team  ARGV[12] to seat
--           (escaped, '' = the org wallet)  ARGV[13] amount  ARGV[14] bucket 'm' | 't'
-- adjust:   ARGV[9] delta (may be negative)  ARGV[10] reason
-- Returns {'OK', replayed (0|1), {{MeterBalance…}, …}} or {'ERR', code, field, msg}.
-- A transfer never moves more than the source has free (held tokens stay put; holds
-- past their TTL, up to 8 of the shard's, are released first, as a Reserve would);
-- transferred monthly tokens still end with the period, top-ups never do.

local cfg, bal, idem, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, now, meter, kind = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local fp, idem_ttl, maxlen = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])

local anchor = redis.call('HGET', cfg, 'anchor')
if anchor == false then return {'ERR', 'NOT_FOUND', 'org_id', 'no such org'} end
local pid, pstart, pend = 0, 0, 0
if kind ~= 'g' then pid, pstart, pend = period_of(now, math.max(1, tonumber(anchor))) end

-- Resolve a (team, seat) pair as given in the request: the seat's team wins.
local function resolve(te, se, tfield, sfield)
  if se ~= '' then
    local st = redis.call('HGET', cfg, 's:' .. se)
    if st == false then return nil, {'ERR', 'NOT_FOUND', sfield, 'no such seat'} end
    if te ~= '' and st ~= te then
      return nil, {'ERR', 'INVALID_ARGUMENT', tfield, 'the seat is not in this team'}
    end
    te = st
  end
  if te ~= '' and redis.call('HEXISTS', cfg, 't:' .. te) == 0 then
    return nil, {'ERR', 'NOT_FOUND', tfield, 'no such team'}
  end
  return {te = te, se = se}
end

-- before: what the wallet's chain had before a transfer out of it (nil: not known); its
-- last tokens gone, the assistants drawing on it are deactivated (after_change).
local function view_of(who, before)
  local ctx = {cfg = cfg, bal = bal, te = who.te, se = who.se, meter = meter, kind = kind,
    pid = pid, pstart = pstart, pend = pend, maxlen = maxlen}
  local ws = chain_load(ctx)
  chain_save(ctx, ws)
  if before and before > 0 and chain_available(ctx, ws) <= 0 then ctx.dry = true end
  after_change(ctx, now, true)
  -- The wallet itself: its own figures (a seat's view would include its team and org).
  local own = {ws[1]}
  local c2 = {org = ctx.org, d = (#ws == 1) and ctx.d or 0, no_org_pool = false,
    ocap = (#ws == 1) and ctx.ocap or 0}
  if #ws > 1 then c2.org = {ou = 0, oh = 0} end
  return chain_view(c2, own, meter, -1, pstart, pend)
end

local prev = redis.call('GET', idem)
if prev then
  if prev ~= fp then
    return {'ERR', 'INVALID_ARGUMENT', 'idempotency_key',
      'idempotency_key was already used for a different request'}
  end
end

local org_e = string.match(cfg, '^.-}:org:(.*)$')
-- Holds past their TTL give their tokens back before anything is moved or taken (once
-- the request is known to be valid: a refused one changes nothing).
local function release_expired()
  sweep_shard(shard_prefix(ledger), now, 8, ledger, maxlen, tonumber(ARGV[8]))
end

if op == 'adjust' then
  local delta, reason = tonumber(ARGV[9]), ARGV[10]
  local who = {te = '', se = ''}
  if not prev then
    release_expired()
    local ctx = {cfg = cfg, bal = bal, te = '', se = '', meter = meter, kind = kind,
      pid = pid, pstart = pstart, pend = pend, maxlen = maxlen}
    local ws = chain_load(ctx)
    local before = chain_available(ctx, ws)
    local ow = ctx.org
    if delta > 0 then
      ow.tb = ow.tb + delta; ow.dirty = true
      ctx.d = settle_debt(ow, ctx.d)
    else
      local left = -delta
      local x = math.min(left, avail_m(ow))
      ow.mu = ow.mu + x; left = left - x
      local y = math.min(left, avail_t(ow))
      ow.tb = ow.tb - y; ow.tu = ow.tu + y; left = left - y
      ctx.d = ctx.d + left
      ow.dirty = true
    end
    chain_save(ctx, ws)
    if before > 0 and chain_available(ctx, ws) <= 0 then ctx.dry = true end
    after_change(ctx, now, delta > 0)
    redis.call('SET', idem, fp, 'PX', idem_ttl)
    ledger_add(ledger, maxlen, {'type', 'adjust', 'org', org_e, 'meter', meter,
      'amount', I(delta), 'reason', reason, 'at', I(now)})
  end
  return {'OK', prev and 1 or 0, {view_of(who)}}
end

-- transfer
local src, err = resolve(ARGV[9], ARGV[10], 'from_team_id', 'from_seat_id')
if not src then return err end
local dst, err2 = resolve(ARGV[11], ARGV[12], 'to_team_id', 'to_seat_id')
if not dst then return err2 end
local amount, bucket = tonumber(ARGV[13]), ARGV[14]
local function key_of(w) if w.se ~= '' then return 'S' .. w.se end
  if w.te ~= '' then return 'T' .. w.te end return 'O' end
if key_of(src) == key_of(dst) then
  -- named by the destination's field: the seat when one was given
  return {'ERR', 'INVALID_ARGUMENT', ARGV[12] ~= '' and 'to_seat_id' or 'to_team_id',
    'source and destination are the same wallet'}
end

local src_before = nil
if not prev then
  release_expired()
  -- Load every wallet involved once (the two chains may share wallets).
  local ctx = {cfg = cfg, bal = bal, te = src.te, se = src.se, meter = meter, kind = kind,
    pid = pid, pstart = pstart, pend = pend, maxlen = maxlen}
  local ws = chain_load(ctx)
  src_before = chain_available(ctx, ws)
  local function wallet(who)
    local pfx = ''
    if who.se ~= '' then pfx = level_pfx('S', who.te, who.se)
    elseif who.te ~= '' then pfx = level_pfx('T', who.te, '') end
    for i = 1, #ws do if ws[i].pfx == pfx then return ws[i] end end
    local grant = 0
    if who.se == '' and who.te ~= '' then
      grant = N(redis.call('HGET', cfg, 'al:' .. meter .. ':' .. who.te))
    end
    local w = wallet_load(bal, pfx, pid, grant)
    ws[#ws + 1] = w
    return w
  end
  local from, to = wallet(src), wallet(dst)
  local free = (bucket == 'm') and avail_m(from) or avail_t(from)
  if free < amount then
    return {'ERR', 'FAILED_PRECONDITION', 'amount', 'the source wallet has only ' .. I(free)
      .. ' free in that bucket'}
  end
  if bucket == 'm' then
    from.mg = from.mg - amount; from.mx = from.mx + amount
    to.mg = to.mg + amount; to.mx = to.mx - amount
  else
    from.tb = from.tb - amount; to.tb = to.tb + amount
  end
  from.dirty = true; to.dirty = true
  ctx.d = settle_debt(ctx.org, ctx.d)
  chain_save(ctx, ws)
  redis.call('SET', idem, fp, 'PX', idem_ttl)
  ledger_add(ledger, maxlen, {'type', 'transfer', 'org', org_e, 'meter', meter,
    'amount', I(amount), 'bucket', bucket, 'from_team', src.te, 'from_seat', src.se,
    'team', dst.te, 'seat', dst.se, 'at', I(now)})
end
return {'OK', prev and 1 or 0, {view_of(src, src_before), view_of(dst)}}
