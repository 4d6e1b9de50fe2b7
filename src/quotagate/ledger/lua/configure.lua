-- configure.lua: the AdminService upserts of one org, each one atomic step.
--
-- KEYS[1]  the org's configuration hash   KEYS[2] the shard's ledger stream
-- KEYS[2+i] (op 'org') balance hash of allowance i's meter
-- ARGV[1]  op: org | team | seat | assistant | feature
-- ARGV[2]  now (ms)   ARGV[3] ledger MAXLEN   ARGV[4] org (escaped)
-- op org:       ARGV[5] plan  ARGV[6] seats  ARGV[7] anchor day  ARGV[8] ai ('1'|'0')
--               (ARGV[6] 'keep': re-apply the plan with the org's current seats, anchor
--               and ai, only if it is still on ARGV[5]; a no-op otherwise)
--               ARGV[9] n allowances, then meter, kind, monthly, per_seat, one_time for each (the
--               plan's allowances, denormalised here so the spend path reads one hash),
--               then the wallet.low thresholds (% used, comma separated, e.g. '80,95'),
--               then '1' to only check (nothing written) or '0'
-- op team:      ARGV[5] team  ARGV[6] seats
-- op seat:      ARGV[5] seat  ARGV[6] team ('' none)  ARGV[7] n limits, then
--               meter, limit, unlimited ('1'|'0') for each
-- op assistant: ARGV[5] assistant  ARGV[6] team  ARGV[7] enabled ('1'|'0')
-- op feature:   ARGV[5] team ('' = org-wide)  ARGV[6] feature  ARGV[7] enabled
-- op template:  ARGV[5] meter  ARGV[6] kind  ARGV[7] mode ('' removes | per_seat | even |
--               custom)  ARGV[8] per_seat  ARGV[9] n, then team, amount for each (custom)
-- op overage:   ARGV[5] meter  ARGV[6] kind  ARGV[7] cap  ARGV[8] unit price (micros)
--               ARGV[9] bill every (micros)
-- op autotopup: ARGV[5] meter  ARGV[6] kind  ARGV[7] threshold  ARGV[8] amount
--               ARGV[9] enabled  ARGV[10] cooldown (ms)  ARGV[11] max per period (0: any)
-- Balance keys of other ops are built here from the shard prefix (keys.py: bal).
-- Returns {'OK', created (1 | 0)} or {'ERR', code, field, msg}. A call that fails
-- returns before its first write: nothing changed.

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

local function bal_key(meter)
  return shard_prefix(cfg) .. 'bal:' .. org .. ':' .. meter
end

local function ctx_for(meter, kind, te)
  local ctx = {cfg = cfg, bal = bal_key(meter), te = te or '', se = '', meter = meter,
    kind = kind}
  if kind == 'g' then ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
  else
    ctx.pid, ctx.pstart, ctx.pend = period_of(now, math.max(1, N(redis.call('HGET', cfg,
      'anchor'))))
  end
  return ctx
end

-- The org's configuration as one HGETALL reads it: its teams (team -> seats, and their
-- ids sorted), its templates (meter -> spec, and the meters sorted), its assistants
-- (assistant -> enabled, sorted), the allocations (field 'al:<meter>:<team>' -> amount)
-- and every field name.
local function cfg_state()
  local st = {teams = {}, order = {}, tmpls = {}, tmeters = {}, as = {}, aorder = {},
    fields = {}, al = {}}
  local flat = redis.call('HGETALL', cfg)
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    st.fields[#st.fields + 1] = f
    if string.sub(f, 1, 3) == 'al:' then st.al[f] = v end
    local te = string.match(f, '^t:(.*)$')
    if te then st.teams[te] = N(v); st.order[#st.order + 1] = te end
    local m = string.match(f, '^tmpl:(.*)$')
    if m then st.tmpls[m] = v; st.tmeters[#st.tmeters + 1] = m end
    local ae = string.match(f, '^as:(.*)$')
    if ae then st.as[ae] = v; st.aorder[#st.aorder + 1] = ae end
  end
  table.sort(st.order); table.sort(st.tmeters); table.sort(st.aorder)
  return st
end

local function parse_spec(spec)
  return string.match(spec, '^([%w_]*)|(%d*)|(%a)|(.*)$')
end

-- A template's allocations (team -> amount) and their total, for the teams of `st` and
-- an org monthly grant of `pool`; nil and the error when they do not fit. Writes nothing.
local function template_allocs(spec, st, pool)
  local mode, per_seat, _, custom = parse_spec(spec)
  local alloc, total = {}, 0
  if mode == 'per_seat' then
    for _, te in ipairs(st.order) do alloc[te] = N(per_seat) * st.teams[te] end
  elseif mode == 'even' then
    if #st.order > 0 then
      local each = math.floor(pool / #st.order)
      for _, te in ipairs(st.order) do alloc[te] = each end
    end
  elseif mode == 'custom' then
    for te, amt in string.gmatch(custom, '([^=,]+)=(%d+)') do
      if st.teams[te] == nil then
        return nil, {'ERR', 'NOT_FOUND', 'custom', 'no such team: ' .. unesc(te)}
      end
      alloc[te] = tonumber(amt)
    end
  end
  for _, a in pairs(alloc) do total = total + a end
  if total > pool then
    return nil, {'ERR', 'FAILED_PRECONDITION', mode == 'custom' and 'custom' or 'per_seat',
      'allocations (' .. I(total) .. ') exceed the org monthly grant (' .. I(pool) .. ')'}
  end
  return alloc, total
end

-- Every template of the org against the grants it will have (pool(meter)), computed
-- before anything is written. Returns meter -> {alloc, total, pool}, or nil and the
-- error, naming `field` (the request field whose new value breaks the template).
local function templates_for(st, pool, field)
  local out = {}
  for _, m in ipairs(st.tmeters) do
    local p = pool(m)
    local alloc, total = template_allocs(st.tmpls[m], st, p)
    if not alloc then
      return nil, {'ERR', total[2], field, 'the allocation template of ' .. unesc(m)
        .. ' would no longer fit: ' .. total[4]}
    end
    out[m] = {alloc = alloc, total = total, pool = p}
  end
  return out
end

-- Write a meter's template and its allocations t (from template_allocs) and apply them
-- to the current period: a team's monthly grant becomes its allocation (minus what it
-- transferred away), the org keeps the rest of its plan grant. Spent tokens still count,
-- and none is made: the period's tokens move as a Transfer would move them. A team keeps
-- what it has used or holds of its grant (a smaller allocation gives the org only the
-- unspent part), and a team whose grant grows takes it from what the org has free (what
-- the org has not is the team's from the next period on).
-- `st` is the configuration as read before this call's writes.
local function write_template(st, meter, spec, t)
  local mode, _, kind = parse_spec(spec)
  local pfx, old = 'al:' .. meter .. ':', {}
  for _, f in ipairs(st.fields) do
    if string.sub(f, 1, #pfx) == pfx then old[#old + 1] = f end
  end
  if #old > 0 then redis.call('HDEL', cfg, unpack(old)) end
  local f = {}
  for _, te in ipairs(st.order) do
    if t.alloc[te] then f[#f + 1] = pfx .. te; f[#f + 1] = I(t.alloc[te]) end
  end
  if mode == '' then
    redis.call('HDEL', cfg, 'tmpl:' .. meter, 'alt:' .. meter)
  else
    f[#f + 1] = 'tmpl:' .. meter; f[#f + 1] = spec
    f[#f + 1] = 'alt:' .. meter; f[#f + 1] = I(t.total)
  end
  if #f > 0 then redis.call('HSET', cfg, unpack(f)) end
  -- Apply to the current period.
  local octx = ctx_for(meter, kind, '')
  local ows = chain_load(octx)
  local ow = octx.org
  local tws, up, sum = {}, {}, 0
  for _, te in ipairs(st.order) do
    -- a wallet not touched yet this period holds the team's allocation as it was
    local w = wallet_load(octx.bal, 'T:' .. te .. ':', octx.pid, N(st.al[pfx .. te]))
    local want = (t.alloc[te] or 0) - w.mx
    if want < w.mg then
      want = math.max(want, math.min(w.mg, w.mu + w.mh))
    else
      up[te] = want - w.mg
    end
    w.mg = want; w.dirty = true
    tws[te] = w
    sum = sum + want + w.mx
  end
  -- the org keeps the rest; where that is less than it has used or holds, the teams'
  -- increases give back their free part
  ow.mg = t.pool - ow.mx - sum; ow.dirty = true
  local short = ow.mu + ow.mh - ow.mg
  for _, te in ipairs(st.order) do
    local w = tws[te]
    if short > 0 and up[te] then
      local back = math.min(short, up[te], math.max(0, w.mg - w.mu - w.mh))
      w.mg = w.mg - back; ow.mg = ow.mg + back; short = short - back
    end
    wallet_save(w)
  end
  octx.d = settle_debt(ow, octx.d)
  chain_save(octx, ows)
  -- a smaller allocation can leave a team's (or the org's) assistants with nothing: each
  -- one's own chain is looked at (deactivate_dry), as after any other change of budget
  octx.dry = true
  after_change(octx, now, true)
end

-- AI switched off for the org (ai '0'): every assistant is inactive for that reason;
-- switched on again ('1'): each is what it is without it (disabled by an admin, its
-- wallet dry, or active). Said on the events stream, which WatchStatus relays.
-- bals: {balance key, meter} of every meter.
local function ai_events(st, ai, bals)
  if #st.aorder == 0 then return end
  local seq = I(N(redis.call('HINCRBY', cfg, 'evseq', 1)))
  for _, ae in ipairs(st.aorder) do
    local reason, meter = 'ai', nil
    if ai == '1' then
      reason = nil
      if st.as[ae] ~= '1' then reason = 'disabled' end
      for i = 1, #bals do
        if not reason and redis.call('HEXISTS', bals[i][1] .. '|ia', ae) == 1 then
          reason, meter = 'exhausted', unesc(bals[i][2])
        end
      end
    end
    if reason then
      emit(cfg, 'assistant.deactivated', 'assistant.deactivated:' .. org .. ':' .. ae
        .. ':ai:' .. seq, org, {assistant_id = unesc(ae), reason = reason, meter = meter},
        now)
    else
      emit(cfg, 'assistant.reactivated', 'assistant.reactivated:' .. org .. ':' .. ae
        .. ':ai:' .. seq, org, {assistant_id = unesc(ae), reason = 'ai'}, now)
    end
  end
end

if op == 'org' then
  local plan, seats, anchor, ai = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
  local na = tonumber(ARGV[9])
  local dry = ARGV[11 + 5 * na] == '1'
  local cur = redis.call('HMGET', cfg, 'plan', 'seats', 'anchor', 'ai')
  local field = (cur[1] == plan) and 'seats' or 'plan'
  if seats == 'keep' then
    -- UpsertPlan re-applying a plan: the org's own settings as they are at this moment,
    -- and only while it is still on the plan (an UpsertOrg in between is never undone).
    if cur[1] ~= plan then return {'OK', 0} end
    seats, anchor, ai = cur[2], tonumber(cur[3]), cur[4]
    field = 'allowances'
  end
  -- Every check before any write: each template must fit the grant the org will have.
  local grants = {}
  for i = 1, na do
    local b = 9 + (i - 1) * 5
    grants[ARGV[b + 1]] = N(ARGV[b + 3]) + N(ARGV[b + 4]) * N(seats)
  end
  local st = cfg_state()
  local tm, e = templates_for(st, function(m)
    if grants[m] then return grants[m] end
    local v = redis.call('HMGET', cfg, 'am:' .. m, 'ap:' .. m)
    return N(v[1]) + N(v[2]) * N(seats)
  end, field)
  if e then return e end
  if dry then return {'OK', 0} end
  local old_anchor = cur[3]
  redis.call('HSET', cfg, 'plan', plan, 'seats', seats, 'anchor', I(anchor), 'ai', ai,
    'lowpct', ARGV[10 + 5 * na] or '80')
  local bals = {}
  for i = 1, na do
    local b = 9 + (i - 1) * 5
    local meter, kind = ARGV[b + 1], ARGV[b + 2]
    local once = tonumber(ARGV[b + 5])
    bals[i] = {KEYS[2 + i], meter}
    redis.call('HSET', cfg, 'am:' .. meter, ARGV[b + 3], 'ap:' .. meter, ARGV[b + 4])
    -- The new allowance applies to the current period at once (used tokens still count).
    local ctx = {cfg = cfg, bal = KEYS[2 + i], te = '', se = '', meter = meter, kind = kind}
    if kind == 'g' then ctx.pid = 0 else ctx.pid = period_of(now, anchor) end
    local ws = chain_load(ctx)
    local allocated = tm[meter] and tm[meter].total or ctx.allocated
    local grant = ctx.plan_grant - allocated - ctx.org.mx
    if ctx.org.mg ~= grant then ctx.org.mg = grant; ctx.org.dirty = true end
    -- A one-time grant (a trial) lands once per org, plan and meter, whatever happens
    -- later: it is recorded like a purchase with a reserved id.
    if once > 0 and redis.call('HSETNX', shard_prefix(cfg) .. 'pur:' .. org,
        'plan-grant:' .. plan .. ':' .. meter, meter .. '|' .. I(once) .. '||') == 1 then
      ctx.org.tb = ctx.org.tb + once; ctx.org.dirty = true
      ledger_add(ledger, maxlen, {'type', 'topup', 'org', org, 'team', '', 'seat', '',
        'meter', meter, 'amount', I(once), 'purchase', 'plan-grant:' .. plan, 'at', I(now)})
    end
    ctx.d = settle_debt(ctx.org, ctx.d)
    chain_save(ctx, ws)
    after_change(ctx, now, true)
  end
  for _, m in ipairs(st.tmeters) do write_template(st, m, st.tmpls[m], tm[m]) end
  if exists and cur[4] ~= ai then ai_events(st, ai, bals) end
  log({'plan', plan, 'seats', seats, 'anchor', I(anchor), 'ai', ai,
    'previous_anchor', old_anchor or ''})
  return {'OK', exists and 0 or 1}
end

if not exists then return {'ERR', 'NOT_FOUND', 'org_id', 'no such org'} end

if op == 'team' then
  local te, seats = ARGV[5], ARGV[6]
  local st = cfg_state()
  local created = (st.teams[te] == nil) and 1 or 0
  if created == 1 then st.order[#st.order + 1] = te; table.sort(st.order) end
  st.teams[te] = N(seats)
  -- Checked before any write: each template must fit with the team's new seats.
  local tm, e = templates_for(st, function(m) return org_grant(cfg, m) end, 'seats')
  if e then return e end
  redis.call('HSET', cfg, 't:' .. te, seats)
  for _, m in ipairs(st.tmeters) do write_template(st, m, st.tmpls[m], tm[m]) end
  log({'team', te, 'seats', seats})
  return {'OK', created}
end

if op == 'seat' then
  local se, te = ARGV[5], ARGV[6]
  if not team_known(te) then return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'} end
  local created = redis.call('HSET', cfg, 's:' .. se, te)
  -- The limits replace the previous ones: a meter not listed has no cap.
  local nl = tonumber(ARGV[7])
  local set, keep = {}, {}
  for i = 1, nl do
    local b = 7 + (i - 1) * 3
    local f = 'sl:' .. se .. ':' .. ARGV[b + 1]
    if ARGV[b + 3] ~= '1' then
      keep[f] = true; set[#set + 1] = f; set[#set + 1] = ARGV[b + 2]
    end
    log({'seat', se, 'team', te, 'meter', ARGV[b + 1], 'limit', ARGV[b + 2],
      'unlimited', ARGV[b + 3]})
  end
  local pfx, drop = 'sl:' .. se .. ':', {}
  for _, f in ipairs(redis.call('HKEYS', cfg)) do
    if string.sub(f, 1, #pfx) == pfx and not keep[f] then drop[#drop + 1] = f end
  end
  if #drop > 0 then redis.call('HDEL', cfg, unpack(drop)) end
  if #set > 0 then redis.call('HSET', cfg, unpack(set)) end
  if nl == 0 then log({'seat', se, 'team', te}) end
  return {'OK', created}
end

if op == 'assistant' then
  local ae, te, enabled = ARGV[5], ARGV[6], ARGV[7]
  if not team_known(te) then return {'ERR', 'NOT_FOUND', 'team_id', 'no such team'} end
  local was = redis.call('HGET', cfg, 'as:' .. ae)
  local created = redis.call('HSET', cfg, 'as:' .. ae, enabled, 'at:' .. ae, te)
  local switched = was and was ~= enabled
  -- Enabled where its wallet has run dry, it stays inactive, as Reserve answers: each
  -- meter (one that deactivates assistants) it was deactivated on or draws on is looked
  -- at with its (new) team; dry, it is (still) listed inactive, else it leaves the list.
  local dry_meter, told = nil, false
  if enabled == '1' then
    local flat = redis.call('HGETALL', cfg)
    local meters = {}
    for i = 1, #flat, 2 do
      local m = string.match(flat[i], '^am:(.*)$')
      if m and not QUIET[m] then meters[#meters + 1] = m end
    end
    table.sort(meters)
    -- the meters it draws on (a Reserve of it granted before); none marked (new, or from
    -- an earlier build, before the marks): every meter the org was ever given anything on
    local drawn, any = {}, false
    for _, meter in ipairs(meters) do
      drawn[meter] = redis.call('HEXISTS', bal_key(meter), 'u:' .. ae) == 1
      any = any or drawn[meter]
    end
    for _, meter in ipairs(meters) do
      local bal = bal_key(meter)
      local ia = bal .. '|ia'
      local w = wallet_unpack(redis.call('HGET', bal, 'w'))
      local listed = redis.call('HEXISTS', ia, ae) == 1
      local given = listed or drawn[meter]
      if w and not any and not given then
        for i = 2, NWF do given = given or w[i] ~= 0 end
      end
      if w and given then
        -- a wallet's period is 0 only for a gauge meter (never reset)
        local ctx = ctx_for(meter, (w[1] == 0) and 'g' or 'c', te)
        ctx.maxlen = maxlen
        local ws = chain_load(ctx)
        chain_save(ctx, ws)
        after_change(ctx, now, false)
        if chain_available(ctx, ws) <= 0 then
          dry_meter = dry_meter or meter
          -- not listed before: listed now, by this or by after_change, with an event
          assistant_deactivate(ctx, ae, 'exhausted', now)
          if not listed then told = true end
        elseif redis.call('HEXISTS', ia, ae) == 1 then
          if switched then
            -- the admin's assistant.reactivated below says it
            redis.call('HDEL', ia, ae)
            inactive_count(ctx, ia)
          else
            assistant_reactivate(ctx, ae, now)
          end
        end
      end
    end
  end
  if switched and not (dry_meter and told) then
    -- Switched by an admin: say so on the events stream (WatchStatus relays it); switched
    -- on with a dry wallet, it is still inactive, for that reason.
    local seq = N(redis.call('HINCRBY', cfg, 'evseq', 1))
    local etype = (enabled == '1' and not dry_meter) and 'assistant.reactivated'
      or 'assistant.deactivated'
    local attrs = {assistant_id = unesc(ae), reason = 'disabled'}
    if dry_meter then attrs.reason = 'exhausted'; attrs.meter = unesc(dry_meter)
    elseif enabled == '1' then attrs.reason = 'enabled' end
    emit(cfg, etype, etype .. ':' .. org .. ':' .. ae .. ':admin:' .. I(seq), org, attrs, now)
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

if op == 'template' then
  local meter, kind, mode, per_seat = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local parts = {}
  for i = 1, tonumber(ARGV[9]) do
    parts[#parts + 1] = ARGV[8 + 2 * i] .. '=' .. ARGV[9 + 2 * i]
  end
  local spec = mode .. '|' .. per_seat .. '|' .. kind .. '|' .. table.concat(parts, ',')
  -- Checked before any write: the teams exist and the allocations fit the grant.
  local st = cfg_state()
  local pool = org_grant(cfg, meter)
  local alloc, total = template_allocs(spec, st, pool)
  if not alloc then return total end
  write_template(st, meter, spec, {alloc = alloc, total = total, pool = pool})
  local out = {}
  for _, te in ipairs(st.order) do
    if alloc[te] then out[#out + 1] = te; out[#out + 1] = alloc[te] end
  end
  log({'meter', meter, 'mode', mode, 'per_seat', per_seat, 'custom', table.concat(parts, ',')})
  return {'OK', 0, out}
end

if op == 'overage' then
  local meter, kind = ARGV[5], ARGV[6]
  redis.call('HSET', cfg, 'oc:' .. meter, ARGV[7], 'op:' .. meter, ARGV[8],
    'obe:' .. meter, ARGV[9])
  local ctx = ctx_for(meter, kind, '')
  local ws = chain_load(ctx)
  chain_save(ctx, ws)
  ctx.dry = true  -- a lower cap can leave assistants with nothing (deactivate_dry looks)
  after_change(ctx, now, true)
  log({'meter', meter, 'cap', ARGV[7], 'unit_price_micros', ARGV[8],
    'bill_every_micros', ARGV[9]})
  return {'OK', 0}
end

if op == 'autotopup' then
  local meter = ARGV[5]
  redis.call('HSET', cfg, 'atu:' .. meter, table.concat({ARGV[7], ARGV[8], ARGV[9], ARGV[10],
    ARGV[11]}, '|'))
  local ctx = ctx_for(meter, ARGV[6], '')
  local ws = chain_load(ctx)
  chain_save(ctx, ws)
  after_change(ctx, now, false)
  log({'meter', meter, 'threshold', ARGV[7], 'amount', ARGV[8], 'enabled', ARGV[9]})
  return {'OK', 0}
end

return {'ERR', 'INVALID_ARGUMENT', 'op', 'unknown configuration op'}
