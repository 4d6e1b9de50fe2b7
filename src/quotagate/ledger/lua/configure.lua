-- configure.lua: the AdminService upserts of one org, each one atomic step.
--
-- KEYS[1]  the org's configuration hash   KEYS[2] the shard's ledger stream
-- KEYS[2+i] (op 'org') balance hash of allowance i's meter
-- ARGV[1]  op: org | team | seat | assistant | feature
-- ARGV[2]  now (ms)   ARGV[3] ledger MAXLEN   ARGV[4] org (escaped)
-- op org:       ARGV[5] plan  ARGV[6] seats  ARGV[7] anchor day  ARGV[8] ai ('1'|'0')
--               ARGV[9] n allowances, then meter, kind, monthly, per_seat for each (the
--               plan's allowances, denormalised here so the spend path reads one hash),
--               then the wallet.low thresholds (% used, comma separated, e.g. '80,95')
-- op team:      ARGV[5] team  ARGV[6] seats
-- op seat:      ARGV[5] seat  ARGV[6] team ('' none)  ARGV[7] n limits, then
--               meter, limit, unlimited ('1'|'0') for each
-- op assistant: ARGV[5] assistant  ARGV[6] team  ARGV[7] enabled ('1'|'0')
-- op feature:   ARGV[5] team ('' = org-wide)  ARGV[6] feature  ARGV[7] enabled
-- Returns {'OK', created (1 | 0)} or {'ERR', code, field, msg}.

local cfg, ledger = KEYS[1], KEYS[2]
local op, now, maxlen, org = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local exists = redis.call('EXISTS', cfg) == 1

local function log(fields)
  local f = {'type', 'config', 'op', op, 'org', org, 'at', I(now)}
  for i = 1, #fields do f[#f + 1] = fields[i] end
  ledger_add(ledger, maxlen, f)
end

local function team_known(te)
  return te == '' or redis.call('HEXISTS', cfg, 't:' .. te) == 1
end

if op == 'org' then
  local plan, seats, anchor, ai = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
  local old_anchor = redis.call('HGET', cfg, 'anchor')
  redis.call('HSET', cfg, 'plan', plan, 'seats', seats, 'anchor', I(anchor), 'ai', ai,
    'lowpct', ARGV[10 + 4 * tonumber(ARGV[9])] or '80')
  local na = tonumber(ARGV[9])
  for i = 1, na do
    local b = 9 + (i - 1) * 4
    local meter, kind = ARGV[b + 1], ARGV[b + 2]
    redis.call('HSET', cfg, 'am:' .. meter, ARGV[b + 3], 'ap:' .. meter, ARGV[b + 4])
    -- The new allowance applies to the current period at once (used tokens still count).
    local ctx = {cfg = cfg, bal = KEYS[2 + i], te = '', se = '', meter = meter, kind = kind}
    if kind == 'g' then ctx.pid = 0 else ctx.pid = period_of(now, anchor) end
    local ws = chain_load(ctx)
    local grant = org_grant(cfg, meter)
    if ctx.org.mg ~= grant then ctx.org.mg = grant; ctx.org.dirty = true end
    ctx.d = settle_debt(ctx.org, ctx.d)
    chain_save(ctx, ws)
    after_change(ctx, now, true)
  end
  log({'plan', plan, 'seats', seats, 'anchor', I(anchor), 'ai', ai,
    'previous_anchor', old_anchor or ''})
  return {'OK', exists and 0 or 1}
end

if not exists then return {'ERR', 'NOT_FOUND', 'org_id', 'no such org'} end

if op == 'team' then
  local te, seats = ARGV[5], ARGV[6]
  local created = redis.call('HSET', cfg, 't:' .. te, seats)
  log({'team', te, 'seats', seats})
  return {'OK', created}
end

if op == 'seat' then
  local se, te = ARGV[5], ARGV[6]
  if not team_known(te) then return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'} end
  local created = redis.call('HSET', cfg, 's:' .. se, te)
  local nl = tonumber(ARGV[7])
  for i = 1, nl do
    local b = 7 + (i - 1) * 3
    local f = 'sl:' .. se .. ':' .. ARGV[b + 1]
    if ARGV[b + 3] == '1' then redis.call('HDEL', cfg, f)
    else redis.call('HSET', cfg, f, ARGV[b + 2]) end
    log({'seat', se, 'team', te, 'meter', ARGV[b + 1], 'limit', ARGV[b + 2],
      'unlimited', ARGV[b + 3]})
  end
  if nl == 0 then log({'seat', se, 'team', te}) end
  return {'OK', created}
end

if op == 'assistant' then
  local ae, te, enabled = ARGV[5], ARGV[6], ARGV[7]
  if not team_known(te) then return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'} end
  local was = redis.call('HGET', cfg, 'as:' .. ae)
  local created = redis.call('HSET', cfg, 'as:' .. ae, enabled, 'at:' .. ae, te)
  if was and was ~= enabled then
    -- Switched by an admin: say so on the events stream (WatchStatus relays it).
    local seq = N(redis.call('HINCRBY', cfg, 'evseq', 1))
    local etype = (enabled == '1') and 'assistant.reactivated' or 'assistant.deactivated'
    emit(cfg, etype, etype .. ':' .. org .. ':' .. ae .. ':admin:' .. I(seq), org,
      {assistant_id = unesc(ae), reason = (enabled == '1') and 'enabled' or 'disabled'}, now)
  end
  log({'assistant', ae, 'team', te, 'enabled', enabled})
  return {'OK', created > 0 and 1 or 0}
end

if op == 'feature' then
  local te, feature, enabled = ARGV[5], ARGV[6], ARGV[7]
  if not team_known(te) then return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'} end
  local f = 'f:' .. feature
  if te ~= '' then f = 'tf:' .. te .. ':' .. feature end
  local created = redis.call('HSET', cfg, f, enabled)
  log({'team', te, 'feature', feature, 'enabled', enabled})
  return {'OK', created}
end

return {'ERR', 'INVALID_ARGUMENT', 'op', 'unknown configuration op'}
