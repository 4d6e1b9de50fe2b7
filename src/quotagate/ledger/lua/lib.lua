-- lib.lua: helpers shared by every script. scripts.py prepends this file to each EVAL
-- script, and puts it once at the head of the spend-path Function library, so each call
-- stays one command (one round trip).
--
-- Wallet layout (see keys.py for the key names): one hash per (org, meter), "bal".
-- A wallet inside it is one field: "w" for the org, "T:<team>:w" for a team,
-- "S:<seat>:w" for a seat (ids escaped by keys.py, so ':' never appears in them). Its
-- value packs these integers, comma-separated, in this order (WF below):
--   p   period id the monthly fields belong to (0 for gauge meters: never reset)
--   mg  monthly tokens granted this period      mu  monthly tokens used this period
--   mh  monthly tokens held by open holds       tb  top-up tokens left (never expire)
--   th  top-up tokens held by open holds        tu  top-up tokens used this period
--   cu  seat only: charged this period (cap)    ch  seat only: held this period (cap)
--   mx  monthly tokens moved out this period by Transfer (negative: moved in)
--   ou  org only: overage used this period      oh  org only: overage held
-- Org-only fields of the hash: d (debt: usage that happened with nothing left to pay
-- it), oub (overage not yet billed, micros), ev (event state), evseq, atu (auto top-up).
-- Numbers are Lua doubles; amounts are capped at 2^50 by the caller, so sums stay exact.

local function I(x)
  return string.format('%d', x)
end

local function N(v)
  if v == false or v == nil then return 0 end
  return tonumber(v) or 0
end

local floor = math.floor

-- Field names made of a name and a number ('m1', 'g2', …), each built once: a
-- concatenation with a number formats it (sprintf) and interns a new string every time.
local HF = {}
local function hf(name, i)
  local t = HF[name]
  if not t then t = {}; HF[name] = t end
  local f = t[i]
  if not f then f = name .. string.format('%d', i); t[i] = f end
  return f
end

-- Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- The billing period holding now_ms for an org whose periods start on day `anchor`
-- (1-28) of each month at 00:00 UTC. Returns id (year*12 + month-1), start ms, end ms.
local function period_compute(day, anchor)
  local y, m, d = civil_from_days(day)
  if d < anchor then
    m = m - 1
    if m == 0 then m = 12; y = y - 1 end
  end
  local ny, nm = y, m + 1
  if nm == 13 then nm = 1; ny = y + 1 end
  return y * 12 + (m - 1), days_from_civil(y, m, anchor) * 86400000,
    days_from_civil(ny, nm, anchor) * 86400000
end

local PERIOD_DAY, PERIODS = -1, {}

local function period_of(now_ms, anchor)
  -- The answer only changes with the day: kept for today, per anchor (a Function
  -- library keeps it between calls; with EVAL it lasts one call).
  local day = floor(now_ms / 86400000)
  if day ~= PERIOD_DAY then PERIOD_DAY, PERIODS = day, {} end
  local hit = PERIODS[anchor]
  if hit then return hit[1], hit[2], hit[3] end
  local id, pstart, pend = period_compute(day, anchor)
  PERIODS[anchor] = {id, pstart, pend}
  return id, pstart, pend
end

local WF = {'p', 'mg', 'mu', 'mh', 'tb', 'th', 'tu', 'cu', 'ch', 'mx', 'ou', 'oh'}
local NWF = #WF
-- A wallet is stored packed, as one field of the balance hash: its prefix, then 'w'
-- ("w", "T:<team>:w", "S:<seat>:w"), holding the twelve WF integers in WF order as
-- MessagePack (cmsgpack.pack of the twelve numbers: an integer takes 1 to 9 bytes, a
-- typical wallet about 25). Decoding it costs a seventh of a JSON array's and a
-- fraction of a pattern's (callgrind: 1.9 k instructions against 13 k), encoding half of
-- string.format's; it is shorter than either, so a balance hash stays a compact
-- listpack (values of at most 64 bytes). One field per wallet keeps a subject's whole
-- chain (seat, team, org) and the org's extra fields a single HMGET, and a save one HSET
-- of what changed. Earlier builds wrote a JSON array "[p,mg,…,oh]" or the integers
-- comma-separated (WPAT); both are still read, MessagePack is written. Python reads and
-- writes the same (ledger/wallet.py).
-- (Written out: a Function library's top level may not call string.rep.)
local WPAT = '^(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),'
  .. '(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+)$'

local function wallet_pack(w)
  return cmsgpack.pack(w.p, w.mg, w.mu, w.mh, w.tb, w.th, w.tu, w.cu, w.ch, w.mx, w.ou,
    w.oh)
end

-- The twelve integers of a packed wallet as a table (nil: none, or unreadable).
local function wallet_unpack(s)
  if not s then return nil end
  local b = string.byte(s, 1)
  if b == 91 then  -- '[': a JSON array (earlier builds)
    local t = cjson.decode(s)
    if #t == NWF then return t end
    return nil
  end
  if b == 45 or (b and b >= 48 and b <= 57) then  -- '-' or a digit: comma-separated
    local v = {string.match(s, WPAT)}
    if #v ~= NWF then return nil end
    for i = 1, NWF do v[i] = tonumber(v[i]) end
    return v
  end
  local t = {cmsgpack.unpack(s)}
  if #t == NWF then return t end
  return nil
end

-- A wallet from its packed value `s` (false: none yet), rolling its monthly fields into
-- period `pid` when they belong to an older one (the lazy reset: unused monthly tokens
-- do not roll over; top-ups stay). `grant` is the monthly allowance for a new period
-- (org: plan; team/seat: 0 or the team's allocation). w.o keeps what was read, so a save
-- writes only a change. `level`: 'S', 'T' or 'O'. The org wallet's extra fields of the
-- hash (debt, event state, auto top-up state) are set by its loader in w.extra.
local function wallet_from(s, bal, pfx, pid, grant, level)
  local t = wallet_unpack(s)
  local p = t and t[1]
  -- Built in one constructor: the table is sized once, never rehashed while it fills.
  local w
  if p then
    w = {bal = bal, pfx = pfx, dirty = false, rolled = false, extra = false, o = s,
      level = level or false, prev_ou = false, prev_p = false,
      p = p, mg = t[2], mu = t[3], mh = t[4], tb = t[5], th = t[6], tu = t[7], cu = t[8],
      ch = t[9], mx = t[10], ou = t[11], oh = t[12]}
  else
    w = {bal = bal, pfx = pfx, dirty = false, rolled = false, extra = false, o = s,
      level = level or false, prev_ou = false, prev_p = false,
      p = 0, mg = 0, mu = 0, mh = 0, tb = 0, th = 0, tu = 0, cu = 0, ch = 0, mx = 0, ou = 0,
      oh = 0}
  end
  if not p or w.p ~= pid then
    w.prev_ou, w.prev_p = w.ou, w.p
    w.p = pid; w.mg = grant; w.mu = 0; w.mh = 0; w.tu = 0; w.cu = 0; w.ch = 0
    w.mx = 0; w.ou = 0; w.oh = 0
    w.dirty = true
    w.rolled = (p ~= nil)
  end
  return w
end

-- Load one wallet. `extra` names more fields of the hash to read in the same HMGET
-- (w.extra[name]).
local function wallet_load(bal, pfx, pid, grant, extra)
  local names = {pfx .. 'w'}
  if extra then
    for i = 1, #extra do names[1 + i] = extra[i] end
  end
  local v = redis.call('HMGET', bal, unpack(names))
  local w = wallet_from(v[1], bal, pfx, pid, grant)
  w.extra = {}
  if extra then
    for i = 1, #extra do w.extra[extra[i]] = v[1 + i] end
  end
  return w
end

-- Append the wallet's packed value to `f` (field, value, …) when it changed.
local function wallet_changes(w, f)
  if not w.dirty then return end
  w.dirty = false
  local s = wallet_pack(w)
  if s == w.o then return end
  w.o = s
  f[#f + 1] = w.pfx .. 'w'; f[#f + 1] = s
end

-- Write the wallet when it changed. `debt`: the org wallet also writes the org's debt in
-- the same HSET.
local function wallet_save(w, debt)
  local f = {}
  wallet_changes(w, f)
  if debt ~= nil then f[#f + 1] = 'd'; f[#f + 1] = I(debt) end
  if #f > 0 then redis.call('HSET', w.bal, unpack(f)) end
end

local function avail_m(w)
  local a = w.mg - w.mu - w.mh
  if a < 0 then return 0 end
  return a
end

local function avail_t(w)
  local a = w.tb - w.th
  if a < 0 then return 0 end
  return a
end

-- What paid debt in the org wallet's current period (field 'dp' of the balance hash,
-- "<period>:<monthly>:<top-up>"): a Refund of usage that became debt gives back what paid
-- it, and only this period's monthly tokens can go back as monthly tokens. Read and
-- written only when debt is paid or refunded, never on the plain spend path. A change is
-- kept in w.dpw and written by chain_save with the wallet it describes: a call that loads
-- the chain, finds the debt paid and is then refused (saving nothing) records nothing.
local function debt_paid(w)
  if w.dpw then return w.dpw[1], w.dpw[2] end
  local v = redis.call('HGET', w.bal, 'dp')
  if v then
    local p, m, t = string.match(v, '^(%d+):(%d+):(%d+)$')
    if p and tonumber(p) == w.p then return tonumber(m), tonumber(t) end
  end
  return 0, 0
end

local function debt_paid_save(w, m, t)
  w.dpw = {m, t}
end

-- Debt is paid first from whatever the org wallet has free: monthly, then top-up.
-- After this, debt > 0 implies the org wallet has nothing available.
local function settle_debt(w, debt)
  if debt <= 0 then return 0 end
  local x = math.min(debt, avail_m(w))
  if x > 0 then w.mu = w.mu + x; debt = debt - x; w.dirty = true end
  local y = math.min(debt, avail_t(w))
  if y > 0 then w.tb = w.tb - y; w.tu = w.tu + y; debt = debt - y; w.dirty = true end
  if x > 0 or y > 0 then
    local m, t = debt_paid(w)
    debt_paid_save(w, m + x, t + y)
  end
  return debt
end

-- Monthly grant of the org's plan for meter m (before allocations to teams).
local function org_grant(cfg, m)
  local v = redis.call('HMGET', cfg, 'am:' .. m, 'ap:' .. m, 'seats')
  return N(v[1]) + N(v[2]) * N(v[3])
end

-- Escaped ids may be empty (no team / no seat). Prefix of a wallet level.
local function level_pfx(level, te, se)
  if level == 'S' then return 'S:' .. se .. ':' end
  if level == 'T' then return 'T:' .. te .. ':' end
  return ''
end

-- Fields of the org's configuration (cfg) that the chain of charge `m` reads, appended
-- to `names`, so one HMGET serves a request's own fields and all of its charges. Ids are
-- escaped ('' when absent: no field is asked for a missing seat or team, as a field that
-- is not there costs a whole scan of a small hash). Returns where they start.
local function meter_fields(names, m, te, se)
  local k0 = #names + 1
  local k = k0 - 1
  names[k + 1] = 'am:' .. m; names[k + 2] = 'ap:' .. m; names[k + 3] = 'alt:' .. m
  names[k + 4] = 'tmpl:' .. m; names[k + 5] = 'oc:' .. m; names[k + 6] = 'op:' .. m
  names[k + 7] = 'obe:' .. m; names[k + 8] = 'atu:' .. m
  k = k + 8
  if se ~= '' then k = k + 1; names[k] = 'sl:' .. se .. ':' .. m end
  if te ~= '' then k = k + 1; names[k] = 'al:' .. m .. ':' .. te end
  return k0
end

-- The values of meter_fields (from index k of the HMGET reply v) into ctx: plan grant,
-- allocations to teams (template), this team's allocation, overage cap and price, auto
-- top-up, the seat cap. `seats` and `lowpct` are the org's own fields.
local function meter_cfg(ctx, v, k, seats, lowpct)
  local am, ap, alt, oc, op, obe = v[k], v[k + 1], v[k + 2], v[k + 4], v[k + 5], v[k + 6]
  ctx.plan_grant = (am and tonumber(am) or 0) + (ap and tonumber(ap) or 0) * seats
  ctx.allocated = alt and tonumber(alt) or 0
  ctx.template = (v[k + 3] ~= false)
  ctx.ohas = (oc ~= false)
  ctx.ocap = oc and tonumber(oc) or 0
  ctx.oprice = op and tonumber(op) or 0
  ctx.obill_every = obe and tonumber(obe) or 0
  ctx.atu = v[k + 7]
  ctx.lowpct = lowpct or '80'
  k = k + 8
  -- Seat cap for this meter: -1 when unlimited (no limit set) or no seat.
  ctx.limit = -1
  if ctx.se ~= '' then
    if v[k] then ctx.limit = tonumber(v[k]) end
    k = k + 1
  end
  ctx.team_grant = 0
  if ctx.te ~= '' then ctx.team_grant = N(v[k]) end
  ctx.cfg_read = true
end

-- The draw chain of a subject for one meter: seat wallet, team wallet, org wallet.
-- ctx = {cfg, bal, te, se, kind, meter} and either the period (pid, pstart, pend) or
-- `now` to find it from the org's anchor day; with meter_cfg's fields when the caller read
-- them already (cfg_read), else they are read here, anchor included, in one HMGET. Returns the list of wallets (org wallet always last) and
-- sets ctx.org, ctx.d (the org debt after settlement). Where the org has an allocation
-- template for the meter (cfg 'tmpl:<meter>'), a team member does not fall through to
-- the org's monthly or top-up pool.
local function chain_load(ctx)
  local te, se = ctx.te, ctx.se
  if not ctx.cfg_read then
    local names = {'seats', 'lowpct', 'anchor'}
    local k = meter_fields(names, ctx.meter, te, se)
    local c = redis.call('HMGET', ctx.cfg, unpack(names))
    meter_cfg(ctx, c, k, N(c[1]), c[2])
    ctx.anchor = c[3]
    if ctx.pid == nil then
      if ctx.kind == 'g' then
        ctx.pid, ctx.pstart, ctx.pend = 0, 0, 0
      else
        ctx.pid, ctx.pstart, ctx.pend = period_of(ctx.now, math.max(1, N(c[3])))
      end
    end
  end
  -- Every wallet of the chain (seat, team, org) and the org's extra fields: one HMGET.
  local bal, pid = ctx.bal, ctx.pid
  local ws, v
  local og = ctx.plan_grant - ctx.allocated
  -- an assistant's call also reads whether it has drawn on this meter before ('u:<ae>')
  local u = ctx.ae and ('u:' .. ctx.ae)
  if se ~= '' and te ~= '' then
    local sp, tp = 'S:' .. se .. ':', 'T:' .. te .. ':'
    if u then v = redis.call('HMGET', bal, sp .. 'w', tp .. 'w', 'w', 'd', 'ev', 'atu', 'iac', u)
    else v = redis.call('HMGET', bal, sp .. 'w', tp .. 'w', 'w', 'd', 'ev', 'atu', 'iac') end
    ws = {wallet_from(v[1], bal, sp, pid, 0, 'S'), wallet_from(v[2], bal, tp, pid,
      ctx.team_grant, 'T'), wallet_from(v[3], bal, '', pid, og, 'O')}
  elseif se ~= '' or te ~= '' then
    local lv = (se ~= '') and 'S' or 'T'
    local p = (se ~= '') and ('S:' .. se .. ':') or ('T:' .. te .. ':')
    if u then v = redis.call('HMGET', bal, p .. 'w', 'w', 'd', 'ev', 'atu', 'iac', u)
    else v = redis.call('HMGET', bal, p .. 'w', 'w', 'd', 'ev', 'atu', 'iac') end
    ws = {wallet_from(v[1], bal, p, pid, (lv == 'T') and ctx.team_grant or 0, lv),
      wallet_from(v[2], bal, '', pid, og, 'O')}
  else
    if u then v = redis.call('HMGET', bal, 'w', 'd', 'ev', 'atu', 'iac', u)
    else v = redis.call('HMGET', bal, 'w', 'd', 'ev', 'atu', 'iac') end
    ws = {wallet_from(v[1], bal, '', pid, og, 'O')}
  end
  local nw = #ws
  local ow = ws[nw]
  -- first draw of this assistant on the meter: chain_save records it
  ctx.new_user = u and not v[nw + 5] and u
  ow.extra = {d = v[nw + 1], ev = v[nw + 2], atu = v[nw + 3], iac = v[nw + 4]}
  -- the debt as stored (chain_save writes it when it moved)
  ow.d0 = N(v[nw + 1])
  -- (ctx.settle_later: see sweep_shard)
  ctx.d = ctx.settle_later and ow.d0 or settle_debt(ow, ow.d0)
  ctx.org = ow
  -- Where the org allocates this meter to teams, a team's allocation is its budget: its
  -- members do not fall through to the org's monthly or top-up pool (overage they may use).
  ctx.no_org_pool = (te ~= '' and ctx.template)
  return ws
end

local function avail_o(ctx)
  local a = ctx.ocap - ctx.org.ou - ctx.org.oh
  if a < 0 then return 0 end
  return a
end

-- (The helpers the spend path runs on every call are written out flat: in Lua 5.1 each
-- call of a small function, math.min included, costs more than the arithmetic it does.)
local function chain_available(ctx, ws, without_overage)
  local total, no_org = 0, ctx.no_org_pool
  for i = 1, #ws do
    local w = ws[i]
    if not (no_org and w.level == 'O') then
      local a = w.mg - w.mu - w.mh
      if a > 0 then total = total + a end
      a = w.tb - w.th
      if a > 0 then total = total + a end
    end
  end
  if without_overage then return total end
  local o = ctx.org
  local a = ctx.ocap - o.ou - o.oh
  if a > 0 then total = total + a end
  return total
end

-- Write every changed wallet of the chain, and the org's debt when it moved: one HSET.
local function chain_save(ctx, ws)
  local f, n = {}, 0
  for i = 1, #ws do
    local w = ws[i]
    if w.dirty then
      w.dirty = false
      local v = wallet_pack(w)
      if v ~= w.o then
        w.o = v
        f[n + 1] = w.pfx .. 'w'; f[n + 2] = v; n = n + 2
      end
    end
  end
  local o = ctx.org
  if o.d0 ~= ctx.d then
    f[n + 1] = 'd'; f[n + 2] = I(ctx.d); n = n + 2
    o.d0 = ctx.d; o.extra.d = ctx.d
  end
  local dp = o.dpw
  if dp then  -- what paid debt this period (debt_paid_save), with the wallet it changed
    o.dpw = nil
    if dp[1] > 0 or dp[2] > 0 then
      f[n + 1] = 'dp'; f[n + 2] = I(o.p) .. ':' .. I(dp[1]) .. ':' .. I(dp[2]); n = n + 2
    else
      redis.call('HDEL', o.bal, 'dp')
    end
  end
  if ctx.new_user then
    f[n + 1] = ctx.new_user; f[n + 2] = '1'; n = n + 2
    ctx.new_user = false
  end
  if n > 0 then redis.call('HSET', ws[1].bal, unpack(f)) end
end

-- Take up to `amount` from the chain in burn order, holding it (mh/th). Returns the list
-- of takes {code, pid, amount} and the amount taken.
-- Take codes: a level (S seat, T team, O org) and a bucket (m monthly, t top-up,
-- o overage); 'D' is debt.
local CODE_M = {S = 'Sm', T = 'Tm', O = 'Om'}
local CODE_T = {S = 'St', T = 'Tt', O = 'Ot'}
local CODE_LEVEL = {Sm = 'S', St = 'S', Tm = 'T', Tt = 'T', Om = 'O', Ot = 'O', Oo = 'O'}
local CODE_KIND = {Sm = 'm', St = 't', Tm = 'm', Tt = 't', Om = 'm', Ot = 't', Oo = 'o'}

local function chain_hold(ctx, ws, amount)
  local takes, nt, left, no_org = {}, 0, amount, ctx.no_org_pool
  for i = 1, #ws do
    local w = ws[i]
    if left > 0 and not (no_org and w.level == 'O') then
      local x = w.mg - w.mu - w.mh
      if x > left then x = left end
      if x > 0 then
        w.mh = w.mh + x; w.dirty = true; left = left - x
        nt = nt + 1; takes[nt] = {CODE_M[w.level], w.p, x}
      end
      local y = w.tb - w.th
      if y > left then y = left end
      if y > 0 then
        w.th = w.th + y; w.dirty = true; left = left - y
        nt = nt + 1; takes[nt] = {CODE_T[w.level], w.p, y}
      end
    end
  end
  local o = ctx.org
  local z = ctx.ocap - o.ou - o.oh
  if z > left then z = left end
  if z > 0 then
    o.oh = o.oh + z; o.dirty = true; left = left - z
    takes[nt + 1] = {'Oo', o.p, z}
  end
  return takes, amount - left
end

-- Takes are stored in a hold as "code:pid:amount,code:pid:amount".
local function takes_encode(takes)
  local parts = {}
  for i = 1, #takes do
    local t = takes[i]
    parts[i] = string.format('%s:%d:%d', t[1], t[2], t[3])
  end
  return table.concat(parts, ',')
end

local function takes_decode(s)
  local out = {}
  if not s or s == '' then return out end
  for code, pid, amt in string.gmatch(s, '(%a+):(%-?%d+):(%d+)') do
    out[#out + 1] = {code, tonumber(pid), tonumber(amt)}
  end
  return out
end

local function takes_merge(a, b)
  local out = {}
  for i = 1, #a do out[#out + 1] = {a[i][1], a[i][2], a[i][3]} end
  for i = 1, #b do
    local merged = false
    for j = 1, #out do
      if out[j][1] == b[i][1] and out[j][2] == b[i][2] then
        out[j][3] = out[j][3] + b[i][3]; merged = true
      end
    end
    if not merged then out[#out + 1] = {b[i][1], b[i][2], b[i][3]} end
  end
  return out
end

-- Canonical burn order of bucket codes; 'D' (debt) comes last, so a refund, which walks
-- this order backwards, pays debt back first, then org top-up, org monthly, team, seat.
local BURN_RANK = {Sm = 1, St = 2, Tm = 3, Tt = 4, Om = 5, Ot = 6, Oo = 7, D = 8}

local function takes_in_burn_order(takes)
  table.sort(takes, function(a, b)
    if BURN_RANK[a[1]] ~= BURN_RANK[b[1]] then return BURN_RANK[a[1]] < BURN_RANK[b[1]] end
    return a[2] < b[2]
  end)
  return takes
end

local function wallet_of(ws, code)
  local level = CODE_LEVEL[code]
  for i = 1, #ws do
    if ws[i].level == level then return ws[i] end
  end
  return nil
end

-- Release (part of) a take: the held tokens go back to their bucket, unless the bucket
-- has since rolled into a new period (then the old period's tokens are simply gone).
local function release_take(ws, take, x)
  local w = wallet_of(ws, take[1])
  if not w or x <= 0 then return end
  local kind = CODE_KIND[take[1]]
  if kind == 'm' then
    if w.p == take[2] then w.mh = math.max(0, w.mh - x); w.dirty = true end
  elseif kind == 'o' then
    if w.p == take[2] then w.oh = math.max(0, w.oh - x); w.dirty = true end
  else
    w.th = math.max(0, w.th - x); w.dirty = true
  end
end

-- Overage tokens used are billed: their price accrues in ctx.billed (micros).
local function overage_used(ctx, x)
  if ctx.org.ou == 0 then ctx.ovfirst = true end  -- the period's first overage
  ctx.org.ou = ctx.org.ou + x; ctx.org.dirty = true
  ctx.billed = (ctx.billed or 0) + x * ctx.oprice
end

-- Turn x held tokens of a take into usage.
local function charge_take(ctx, ws, take, x)
  local w = wallet_of(ws, take[1])
  if not w or x <= 0 then return end
  local kind = CODE_KIND[take[1]]
  if kind == 'm' then
    if w.p == take[2] then w.mh = math.max(0, w.mh - x); w.mu = w.mu + x; w.dirty = true end
  elseif kind == 'o' then
    if w.p == take[2] then w.oh = math.max(0, w.oh - x) end
    overage_used(ctx, x)
  else
    w.th = math.max(0, w.th - x); w.tb = w.tb - x
    if w.p == take[2] then w.tu = w.tu + x end
    w.dirty = true
  end
end

-- Charge `amount` straight from what is available (no hold), in burn order; the rest
-- becomes org debt. Used for a Commit above what was held and for late commits.
-- Returns the takes charged and the part that became debt.
local function chain_charge_free(ctx, ws, amount)
  local takes, left = {}, amount
  for i = 1, #ws do
    local w = ws[i]
    if left > 0 and not (w.level == 'O' and ctx.no_org_pool) then
      local x = math.min(left, avail_m(w))
      if x > 0 then
        w.mu = w.mu + x; w.dirty = true; left = left - x
        takes[#takes + 1] = {w.level .. 'm', w.p, x}
      end
      local y = math.min(left, avail_t(w))
      if y > 0 then
        w.tb = w.tb - y; w.tu = w.tu + y; w.dirty = true; left = left - y
        takes[#takes + 1] = {w.level .. 't', w.p, y}
      end
    end
  end
  local z = math.min(left, avail_o(ctx))
  if z > 0 then
    overage_used(ctx, z); left = left - z
    takes[#takes + 1] = {'Oo', ctx.org.p, z}
  end
  if left > 0 then
    ctx.d = ctx.d + left
    takes[#takes + 1] = {'D', 0, left}
  end
  return takes, left
end

-- What a refill already paid for refunded debt is given back, undoing settle_debt: what
-- this period's top-up paid goes back to top-up, what this period's monthly tokens paid
-- goes back to monthly, and what an earlier period paid (its monthly tokens are gone)
-- is returned as top-up. Only what settle_debt recorded in 'dp' counts as this period's,
-- so usage the wallet charged for itself is never given back by a debt's refund.
local function credit_settled(ctx, rest)
  if rest <= 0 then return end
  local ow = ctx.org
  local m, t = debt_paid(ow)
  local y = math.min(rest, t, ow.tu)
  ow.tu = ow.tu - y; ow.tb = ow.tb + y; rest = rest - y; t = t - y
  local z = math.min(rest, m, ow.mu)
  ow.mu = ow.mu - z; rest = rest - z; m = m - z
  ow.tb = ow.tb + rest  -- paid in an earlier period: returned as top-up
  ow.dirty = true
  debt_paid_save(ow, m, t)
end

-- Give back charged tokens (a Refund after Commit), at most what each take charged.
-- Returns, for a debt take, the part a refill already paid (for credit_settled).
local function credit_take(ctx, ws, take, x)
  if x <= 0 then return 0 end
  if take[1] == 'D' then
    -- Usage that became debt: what the debt still holds is forgiven.
    local fromd = math.min(ctx.d, x)
    ctx.d = ctx.d - fromd
    return x - fromd
  end
  local w = wallet_of(ws, take[1])
  if not w then return 0 end
  local kind = CODE_KIND[take[1]]
  if kind == 'm' then
    if w.p == take[2] then w.mu = math.max(0, w.mu - x); w.dirty = true end
  elseif kind == 'o' then
    -- Commit counted overage in its own period (ctx.commit_pid), whatever the take's
    if w.p == (ctx.commit_pid or take[2]) then
      w.ou = math.max(0, w.ou - x); w.dirty = true
      ctx.billed = (ctx.billed or 0) - x * ctx.oprice
    end
  else
    w.tb = w.tb + x
    if w.p == take[2] then w.tu = math.max(0, w.tu - x) end
    w.dirty = true
  end
  return 0
end

-- The MeterBalance figures of a subject for one meter (see DESIGN §4). `room` is what
-- the seat cap still allows (-1: no cap). As a new table, or appended to `into`.
local function chain_view(ctx, ws, meter, room, pstart, pend, into)
  local mg, mu, tb, th, tu, mh, remaining = 0, 0, 0, 0, 0, 0, 0
  local no_org = ctx.no_org_pool
  for i = 1, #ws do
    local w = ws[i]
    if not (no_org and w.level == 'O') then
      local wmg, wmu, wmh, wtb, wth = w.mg, w.mu, w.mh, w.tb, w.th
      mg = mg + wmg; mu = mu + wmu; mh = mh + wmh
      tb = tb + wtb; th = th + wth; tu = tu + w.tu
      local a = wmg - wmu - wmh
      if a > 0 then remaining = remaining + a end
      a = wtb - wth
      if a > 0 then remaining = remaining + a end
    end
  end
  local ou, oh = ctx.org.ou, ctx.org.oh
  local a = ctx.ocap - ou - oh
  if a > 0 then remaining = remaining + a end
  if room >= 0 and room < remaining then remaining = room end
  -- Numbers, not strings: Redis answers them as integers (exact below 2^53), and no
  -- string is formatted for them here.
  if not into then
    return {meter, mu + tu + ou + ctx.d, mg + tb + tu, remaining, mh + th + oh, mg, mu, tb,
      ou, ctx.ocap, ctx.d, pstart, pend}
  end
  local n, d = #into, ctx.d
  into[n + 1] = meter; into[n + 2] = mu + tu + ou + d; into[n + 3] = mg + tb + tu
  into[n + 4] = remaining; into[n + 5] = mh + th + oh; into[n + 6] = mg; into[n + 7] = mu
  into[n + 8] = tb; into[n + 9] = ou; into[n + 10] = ctx.ocap; into[n + 11] = d
  into[n + 12] = pstart; into[n + 13] = pend
  return into
end

-- The spend path's replies are flat arrays (Redis converts each nested table of a reply
-- with a dozen lookups): a list of charges is its count then meter, amount pairs
-- (put_pairs); a list of balances its count then chain_view's 13 figures each.
local function put_pairs(out, list)
  local n, np = #out, #list
  out[n + 1] = np / 2
  for i = 1, np do out[n + 1 + i] = list[i] end
  return out
end

local function put_all(out, list)
  local n = #out
  for i = 1, #list do out[n + i] = list[i] end
  return out
end

-- Seat cap: limit for the seat and meter, or -1 when unlimited (the default).
local function seat_limit(cfg, se, meter, ctx)
  if se == '' then return -1 end
  if ctx and ctx.limit then return ctx.limit end
  local v = redis.call('HGET', cfg, 'sl:' .. se .. ':' .. meter)
  if v == false then return -1 end
  return tonumber(v)
end

local function seat_room(ws, se, limit)
  if se == '' or limit < 0 then return -1 end
  local w = ws[1]
  local r = limit - w.cu - w.ch
  if r < 0 then return 0 end
  return r
end

-- Append an entry to the shard's ledger stream (the syncer copies it to SQL). Fields
-- whose value is '' (no team, no seat, no labels, …) are left out: the syncer reads an
-- absent field as '', and every field left out is bytes saved in the stream, in the AOF
-- and in the replication stream.
local function ledger_add(stream, maxlen, fields)
  local j = 0
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if v ~= '' then fields[j + 1] = fields[i]; fields[j + 2] = v; j = j + 2 end
  end
  for i = #fields, j + 1, -1 do fields[i] = nil end
  if maxlen > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', I(maxlen), '*', unpack(fields))
  else
    redis.call('XADD', stream, '*', unpack(fields))
  end
end

-- The spend path's entries (reserve, commit, release, expire, extend) are one field, 'p':
-- their fifteen values in a fixed order (sink.SPEND_FIELDS: type, rid, org, team, seat,
-- assistant, meter, amount, takes, late, action, feature, labels, at, anchor), joined by
-- newlines, built by one table.concat. Values are escaped ids, digits, takes and labels
-- JSON (written by the server with every control character escaped), none of which can
-- hold a newline. One field instead of up to fourteen is that much less work for XADD,
-- the stream's listpack, the AOF and replicas; leaving the names out (earlier builds
-- wrote them in, alternating with the values, as field 'e') saves another 82 bytes an
-- entry: a third of what an entry waiting for SQL takes in Redis. The syncer
-- (sink.entry_fields) reads every form. Empty values are kept (the syncer drops them).
-- h: the hold, or a table with the same fields (rid, o, te, se, ae, act, feat). Numbers
-- as I() strings (table.concat would write large ones with an exponent).
local function spend_entry(stream, maxlen, kind, h, meter, amount, takes, late, labels, now,
    anchor)
  local e = table.concat({kind, h.rid, h.o, h.te, h.se, h.ae, meter, I(amount), takes, late,
    h.act, h.feat, labels, I(now), anchor or ''}, '\n')
  if maxlen > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'p', e)
  else
    redis.call('XADD', stream, '*', 'p', e)
  end
end

-- ---------------------------------------------------------------------------------
-- Holds. A hold is a hash (keys.py: hold_key) with:
--   st  H (held) | C (committed) | R (refunded) | E (expired)
--   o               escaped org id
--   te, se, ae      escaped team, seat, assistant ids (absent when none)
--   n               number of charges; for charge i (1-based):
--   m<i> meter  k<i> kind (c counter | g gauge)  g<i> amount held
--   t<i> takes "code:pid:amount,…" (codes Sm St Tm Tt Om Ot)  hp<i> period of the seat cap
--   c<i> charged by Commit   x<i> takes charged ("D" = debt)   r<i> refunded
--   op<i> unit price (micros) the Commit billed its overage at (only when it used any)
--   exp  expiry (ms)   act  action   feat  feature   lbl  labels (JSON) (absent when none)
--   at   when it was made (ms)   done  when it was resolved (ms)
-- hold_read adds what follows from the key and the fields, so a hold never stores it:
--   rid  the reservation id   pre  the shard's key prefix   cfg  the org's configuration
--   b<i> charge i's balance key. Holds written before this layout carry them; they agree.
-- ---------------------------------------------------------------------------------

local HOLD_STATE = {H = 1, C = 2, R = 3, E = 4}

local after_change  -- defined with the events below; holds call it after each change  -- HoldState enum numbers in the proto

local function hold_ctx(h, i, now, maxlen)
  -- the period follows from the org's anchor day, read by chain_load with the rest of
  -- the configuration; maxlen: the ledger stream's cap (wallet_events' entries)
  return {cfg = h.cfg, bal = h.b[i], te = h.te, se = h.se, meter = h.m[i],
    kind = h.k[i], now = now, maxlen = maxlen}
end

-- The shard prefix ("<ns>:{<shard>}:") a key starts with.
local function shard_prefix(key)
  return string.sub(key, 1, string.find(key, '}:', 1, true) + 1)
end

local HOLD_TEXT = {'te', 'se', 'ae', 'act', 'feat', 'lbl'}
-- Per-charge fields of a hold: field 'm1' of the hash is h.m[1] once read.
local HOLD_ARRAYS = {'m', 'k', 'g', 't', 'hp', 'c', 'x', 'r', 'b'}

local function hold_read(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  local n = tonumber(h.n)
  h.n = n
  for j = 1, #HOLD_TEXT do
    if not h[HOLD_TEXT[j]] then h[HOLD_TEXT[j]] = '' end
  end
  for j = 1, #HOLD_ARRAYS do
    local name = HOLD_ARRAYS[j]
    local arr = {}
    for i = 1, n do arr[i] = h[hf(name, i)] end
    h[name] = arr
  end
  if not h.pre then h.pre = shard_prefix(key) end
  if not h.rid then h.rid = string.sub(key, #h.pre + 3) end
  if not h.cfg then h.cfg = h.pre .. 'org:' .. h.o end
  for i = 1, n do
    if not h.b[i] then h.b[i] = h.pre .. 'bal:' .. h.o .. ':' .. h.m[i] end
  end
  return h
end

-- Seat cap bookkeeping of a hold: the held amount leaves `ch`, `charged` enters `cu`.
local function seat_settle(ws, h, i, charged)
  if h.se == '' then return end
  local w = ws[1]
  if w.level ~= 'S' then return end
  if w.p == tonumber(h.hp[i]) then w.ch = math.max(0, w.ch - N(h.g[i])) end
  if charged > 0 then w.cu = w.cu + charged end
  w.dirty = true
end

-- Release every take of a HELD hold (Refund before Commit, or expiry).
local function hold_release_all(h, key, now, state, ledger, maxlen, retain_ms, kind,
    settle_later)
  for i = 1, h.n do
    local ctx = hold_ctx(h, i, now, maxlen)
    ctx.settle_later = settle_later
    local ws = chain_load(ctx)
    local takes = takes_decode(h.t[i])
    for j = 1, #takes do release_take(ws, takes[j], takes[j][3]) end
    seat_settle(ws, h, i, 0)
    chain_save(ctx, ws)
    after_change(ctx, now, true)
    spend_entry(ledger, maxlen, kind, h, h.m[i], h.g[i], h.t[i], '', h.lbl, now, ctx.anchor)
  end
  redis.call('HSET', key, 'st', state, 'done', I(now))
  redis.call('PEXPIRE', key, retain_ms)
  redis.call('ZREM', h.pre .. 'exp', h.rid)
end

-- Expire up to `limit` holds of the shard whose TTL has passed. Returns how many.
local function sweep_shard(pre, now, limit, ledger, maxlen, retain_ms)
  local due = redis.call('ZRANGEBYSCORE', pre .. 'exp', '-inf', I(now), 'LIMIT', 0, limit)
  -- The batch comes back as one refill: debt waits for the next call, which settles it
  -- from all of it in burn order (monthly before top-up). Settled between releases,
  -- which hold of the batch happened to come first would decide whether top-up tokens
  -- pay it while monthly ones were on their way back.
  local later = #due > 1
  for k = 1, #due do
    local key = pre .. 'h:' .. due[k]
    local h = hold_read(key)
    if h and h.st == 'H' then
      hold_release_all(h, key, now, 'E', ledger, maxlen, retain_ms, 'expire', later)
    else
      redis.call('ZREM', pre .. 'exp', due[k])
    end
  end
  return #due
end

-- ---------------------------------------------------------------------------------
-- Events (DESIGN §5), written to the shard's events stream in the same atomic step as
-- the change. Each has a stable id: the same crossing never yields two ids.
-- Fields: id, type, org (raw id), attrs (JSON object of strings), at (ms).
-- ---------------------------------------------------------------------------------

local function unesc(s)
  return (string.gsub(s, '%%(%x%x)', function(h) return string.char(tonumber(h, 16)) end))
end

local function emit(key, etype, id, org_e, attrs, now)
  local a = {}
  for k, v in pairs(attrs) do a[k] = tostring(v) end
  redis.call('XADD', shard_prefix(key) .. 'events', 'MAXLEN', '~', '100000', '*',
    'id', id, 'type', etype, 'org', unesc(org_e), 'attrs', cjson.encode(a), 'at', I(now))
end

local function org_of(ctx)
  if not ctx.org_e then ctx.org_e = string.match(ctx.cfg, '^.-}:org:(.*)$') end
  return ctx.org_e
end

-- Org wallet events after a change: wallet.low at each threshold of % used (once per
-- period), wallet.exhausted when nothing is left even once holds resolve, and
-- wallet.replenished when an exhausted wallet can pay again. State in the bal field 'ev':
-- "<period>|<thresholds reached, comma separated>|<exhausted 0/1>".
-- Parsed 'ev' states and threshold lists, kept between calls (they take few distinct
-- values: one per period and thresholds reached), so the common call — nothing crossed —
-- decides without a pattern match or a table. Emptied when they grow past CACHE_MAX.
local CACHE_MAX = 1024
local EVS, NEVS, THS = {}, 0, {}

local function ev_state(ev)
  local st = EVS[ev]
  if st == nil then
    local epid, lows, x = string.match(ev, '^(%-?%d+)|([%d,]*)|(%d)$')
    st = false
    if epid then
      local seen = {}
      for t in string.gmatch(lows, '%d+') do seen[t] = true end
      st = {pid = tonumber(epid), seen = seen, x = x}
    end
    if NEVS >= CACHE_MAX then EVS, NEVS = {}, 0 end
    EVS[ev] = st; NEVS = NEVS + 1
  end
  return st
end

local function thresholds(spec)
  local list = THS[spec]
  if not list then
    list = {}
    for t in string.gmatch(spec, '%d+') do list[#list + 1] = {t, tonumber(t)} end
    THS[spec] = list
  end
  return list
end

local function wallet_events(ctx, now)
  local ow = ctx.org
  if not ow then return end
  local total = ow.mg + ow.tb + ow.tu
  local used = ow.mu + ow.tu + ctx.d
  local left = (ow.mg - ow.mu) + ow.tb - ctx.d
  local ev = ow.extra.ev or ''
  -- Nothing to tell (same period, no new threshold, no change of exhaustion): done.
  local st = ev_state(ev)
  if st and st.pid == ctx.pid then
    local quiet = not ((left <= 0 and st.x == '0' and (total > 0 or used > 0))
      or (left > 0 and st.x == '1'))
    if quiet and total > 0 then
      local th = thresholds(ctx.lowpct or '80')
      for j = 1, #th do
        local t = th[j]
        if not st.seen[t[1]] and used * 100 >= t[2] * total then quiet = false; break end
      end
    end
    if quiet then return end
  end
  local o = org_of(ctx)
  local epid, lows, x = string.match(ev, '^(%-?%d+)|([%d,]*)|(%d)$')
  if epid == nil or tonumber(epid) ~= ctx.pid then
    if epid ~= nil and tonumber(epid) ~= ctx.pid and ctx.kind ~= 'g' then
      emit(ctx.bal, 'period.reset', 'period.reset:' .. o .. ':' .. ctx.meter .. ':' .. I(ctx.pid),
        o, {meter = unesc(ctx.meter), period_start = I(ctx.pstart or 0)}, now)
      -- the configured cap (ctx.maxlen, 0: none); a script that is not given it trims
      -- nothing here (the next entry of one that is trims the stream)
      ledger_add(shard_prefix(ctx.bal) .. 'ledger', ctx.maxlen or 0, {'type', 'period_reset',
        'org', o, 'meter', ctx.meter, 'amount', I(ow.mg), 'period', I(ctx.pid), 'at', I(now)})
    end
    lows, x = '', (x or '0')
  end
  local seen = {}
  for t in string.gmatch(lows, '%d+') do seen[t] = true end
  local changed = (epid == nil or tonumber(epid) ~= ctx.pid)
  local th = ctx.lowpct or '80'
  for t in string.gmatch(th, '%d+') do
    if total > 0 and not seen[t] and used * 100 >= tonumber(t) * total then
      seen[t] = true; changed = true
      emit(ctx.bal, 'wallet.low', 'wallet.low:' .. o .. ':' .. ctx.meter .. ':' .. I(ctx.pid)
        .. ':' .. t, o, {meter = unesc(ctx.meter), threshold_percent = t, used = I(used),
        total = I(total)}, now)
    end
  end
  if left <= 0 and x == '0' and (total > 0 or used > 0) then
    x = '1'; changed = true
    ctx.dry = true  -- after_change deactivates the assistants it leaves with nothing
    ctx.seq = N(redis.call('HINCRBY', ctx.bal, 'evseq', 1))
    emit(ctx.bal, 'wallet.exhausted', 'wallet.exhausted:' .. o .. ':' .. ctx.meter .. ':'
      .. I(ctx.seq), o, {meter = unesc(ctx.meter), used = I(used), total = I(total)}, now)
  elseif left > 0 and x == '1' then
    x = '0'; changed = true
    ctx.seq = N(redis.call('HINCRBY', ctx.bal, 'evseq', 1))
    emit(ctx.bal, 'wallet.replenished', 'wallet.replenished:' .. o .. ':' .. ctx.meter .. ':'
      .. I(ctx.seq), o, {meter = unesc(ctx.meter), remaining = I(left)}, now)
  end
  if changed then
    local list = {}
    for t in pairs(seen) do list[#list + 1] = t end
    table.sort(list)
    ow.extra.ev = I(ctx.pid) .. '|' .. table.concat(list, ',') .. '|' .. x
    redis.call('HSET', ctx.bal, 'ev', ow.extra.ev)
  end
end

-- Assistants whose wallet ran dry are listed in '<bal>|ia' (assistant -> deactivation
-- sequence), so a refill can reactivate exactly those. The balance hash's field 'iac'
-- counts them (read with the wallets): at '0' nothing is looked up. Where it is absent
-- (an org of an earlier build, a restore) the list itself is looked at, and the count
-- written.
local function no_inactive(ctx)
  return ctx.org ~= nil and ctx.org.extra and ctx.org.extra.iac == '0'
end

local function inactive_count(ctx, ia)
  local c = I(redis.call('HLEN', ia))
  redis.call('HSET', ctx.bal, 'iac', c)
  if ctx.org and ctx.org.extra then ctx.org.extra.iac = c end
end

-- Returns true when it was not deactivated yet (and now is, with an event).
local function assistant_deactivate(ctx, ae, reason, now)
  if QUIET[ctx.meter] then return false end  -- running dry stops only that feature
  local ia = ctx.bal .. '|ia'
  if redis.call('HEXISTS', ia, ae) == 1 then return false end
  local seq = N(redis.call('HINCRBY', ctx.bal, 'evseq', 1))
  redis.call('HSET', ia, ae, I(seq))
  inactive_count(ctx, ia)
  local o = org_of(ctx)
  emit(ctx.bal, 'assistant.deactivated', 'assistant.deactivated:' .. o .. ':' .. ae .. ':'
    .. ctx.meter .. ':' .. I(seq), o, {assistant_id = unesc(ae), meter = unesc(ctx.meter),
    reason = reason}, now)
  return true
end

local function assistant_reactivate(ctx, ae, now)
  if no_inactive(ctx) then return end
  local ia = ctx.bal .. '|ia'
  local seq = redis.call('HGET', ia, ae)
  if not seq then return end
  redis.call('HDEL', ia, ae)
  inactive_count(ctx, ia)
  -- With AI off for the org it stays inactive all the same: switching AI on says so.
  if redis.call('HGET', ctx.cfg, 'ai') == '0' then return end
  local o = org_of(ctx)
  emit(ctx.bal, 'assistant.reactivated', 'assistant.reactivated:' .. o .. ':' .. ae .. ':'
    .. ctx.meter .. ':' .. seq, o, {assistant_id = unesc(ae), meter = unesc(ctx.meter)}, now)
end

-- After a refill (top-up, refund, release, transfer, new period): every deactivated
-- assistant of this org and meter whose wallet can pay again comes back.
local function reactivate_all(ctx, now)
  if no_inactive(ctx) then return end
  local ia = ctx.bal .. '|ia'
  if redis.call('EXISTS', ia) == 0 then
    if ctx.org and ctx.org.extra then inactive_count(ctx, ia) end
    return
  end
  local flat = redis.call('HGETALL', ia)
  for i = 1, #flat, 2 do
    local ae = flat[i]
    local a = redis.call('HMGET', ctx.cfg, 'as:' .. ae, 'at:' .. ae)
    if a[1] == '1' then
      local c = {cfg = ctx.cfg, bal = ctx.bal, te = a[2] or '', se = '', meter = ctx.meter,
        kind = ctx.kind, pid = ctx.pid, pstart = ctx.pstart, pend = ctx.pend}
      local ws = chain_load(c)
      chain_save(c, ws)
      if chain_available(c, ws) > 0 then assistant_reactivate(ctx, ae, now) end
    end
  end
end

-- A wallet ran dry (ctx.dry: a chain's last tokens went, or wallet.exhausted): every
-- enabled assistant of the org whose own chain for this meter (its team's wallet, the org
-- wallet unless a template keeps the team off it, the overage) has nothing left is
-- deactivated, once, as Reserve would find it. One chain is looked at per team. Runs on
-- the crossing only, after the caller's wallets are saved.
local function deactivate_dry(ctx, now)
  ctx.dry = false
  if QUIET[ctx.meter] then return end
  local flat = redis.call('HGETALL', ctx.cfg)
  local c, ids = {}, {}
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    c[f] = v
    if v == '1' and string.sub(f, 1, 3) == 'as:' then ids[#ids + 1] = string.sub(f, 4) end
  end
  table.sort(ids)
  -- Only those that have drawn on this meter (a Reserve granted): a chatbot does not
  -- draw on call seconds. Read 500 at a time (Lua's unpack has a limit). Where none has
  -- a mark yet (a wallet of an earlier build's, before the marks), every one is looked at.
  local keep = {}
  for b = 1, #ids, 500 do
    local names = {}
    for i = b, math.min(#ids, b + 499) do names[#names + 1] = 'u:' .. ids[i] end
    local used = redis.call('HMGET', ctx.bal, unpack(names))
    for j = 1, #names do if used[j] then keep[#keep + 1] = ids[b + j - 1] end end
  end
  if #keep > 0 then ids = keep end
  local dry = {}
  for i = 1, #ids do
    local ae = ids[i]
    local te = c['at:' .. ae] or ''
    local d = dry[te]
    if d == nil then
      local x = {cfg = ctx.cfg, bal = ctx.bal, te = te, se = '', meter = ctx.meter,
        kind = ctx.kind, pid = ctx.pid, pstart = ctx.pstart, pend = ctx.pend}
      local ws = chain_load(x)
      chain_save(x, ws)
      d = chain_available(x, ws) <= 0
      dry[te] = d
    end
    if d then assistant_deactivate(ctx, ae, 'exhausted', now) end
  end
end

-- Overage billing: every overage token used costs its price; each time the unbilled amount
-- reaches bill_every, overage.threshold_reached carries the amount to bill. At the first
-- touch of a new period, overage.period_closed carries the rest of the old one.
-- overage.threshold_reached each time the unbilled overage money reaches bill_every.
local function overage_threshold(ctx, o, unbilled, ou, now)
  if ctx.obill_every > 0 and unbilled >= ctx.obill_every then
    local seq = N(redis.call('HINCRBY', ctx.bal, 'evseq', 1))
    emit(ctx.bal, 'overage.threshold_reached', 'overage.threshold_reached:' .. o .. ':'
      .. ctx.meter .. ':' .. I(seq), o, {meter = unesc(ctx.meter), amount_micros = I(unbilled),
      overage_tokens = I(ou)}, now)
    redis.call('HSET', ctx.bal, 'oub', '0')
  end
end

-- A gauge meter (stored bytes) has no period of its own, but its overage is billed by
-- the org's billing periods too: what is unbilled when a period ends comes in
-- overage.period_closed (overage_tokens: the gauge's overage then). Field 'gop' of the
-- balance hash: the period that unbilled overage accrued in (absent: none); the index
-- 'ovc' has that period's end, so the sweeper closes it for an org nobody touches.
local function gauge_close(bal, o, meter, gop, rest, ou, now)
  if rest ~= 0 then
    emit(bal, 'overage.period_closed', 'overage.period_closed:' .. o .. ':' .. meter .. ':'
      .. gop, o, {meter = unesc(meter), amount_micros = I(rest), overage_tokens = I(ou)}, now)
  end
  redis.call('HSET', bal, 'oub', '0')
  redis.call('HDEL', bal, 'gop')
end

local function gauge_overage_events(ctx, ow, o, now)
  local billed = ctx.billed or 0
  ctx.billed = 0
  ctx.ovfirst = false
  if billed == 0 and not ctx.ohas then return end  -- no overage: nothing to bill or close
  local anchor = ctx.anchor
  if anchor == nil then anchor = redis.call('HGET', ctx.cfg, 'anchor') end
  local gp, _, gpend = period_of(now, math.max(1, N(anchor)))
  local v = redis.call('HMGET', ctx.bal, 'gop', 'oub')
  local gop = v[1]
  if gop and tonumber(gop) ~= gp then  -- the period it accrued in has ended
    gauge_close(ctx.bal, o, ctx.meter, gop, N(v[2]), ow.ou, now)
    gop = false
  end
  if billed == 0 then return end
  local unbilled = N(redis.call('HINCRBY', ctx.bal, 'oub', I(billed)))
  if not gop then
    redis.call('HSET', ctx.bal, 'gop', I(gp))
    redis.call('ZADD', shard_prefix(ctx.bal) .. 'ovc', I(gpend), o .. '|' .. ctx.meter)
  end
  overage_threshold(ctx, o, unbilled, ow.ou, now)
end

local function overage_events(ctx, now)
  local ow = ctx.org
  if not ow then return end
  local o = org_of(ctx)
  if ctx.kind == 'g' then return gauge_overage_events(ctx, ow, o, now) end
  if ow.rolled then
    local rest = N(redis.call('HGET', ctx.bal, 'oub'))
    -- (a rest below 0 is a credit: overage billed at a threshold, then refunded)
    if rest ~= 0 or N(ow.prev_ou) > 0 then
      emit(ctx.bal, 'overage.period_closed', 'overage.period_closed:' .. o .. ':' .. ctx.meter
        .. ':' .. I(ow.prev_p), o, {meter = unesc(ctx.meter), amount_micros = I(rest),
        overage_tokens = I(N(ow.prev_ou))}, now)
      redis.call('HSET', ctx.bal, 'oub', '0')
    end
  end
  -- The period's overage must be closed (and billed) when it ends, even if nobody
  -- touches the org then: the sweeper closes what the index 'ovc' says is due. Written
  -- at the period's first overage and whenever billing starts again from 0 (after each
  -- overage.threshold_reached: so an org already in overage when this build arrived is
  -- indexed too, unless it bills only at the period's end), not at every call.
  local first = ctx.ovfirst
  ctx.ovfirst = false
  local billed = ctx.billed or 0
  ctx.billed = 0
  local unbilled = (billed ~= 0) and N(redis.call('HINCRBY', ctx.bal, 'oub', I(billed))) or 0
  if (first or (billed > 0 and unbilled == billed)) and (ctx.pend or 0) > 0 then
    redis.call('ZADD', shard_prefix(ctx.bal) .. 'ovc', I(ctx.pend), o .. '|' .. ctx.meter)
  end
  if billed == 0 then return end
  overage_threshold(ctx, o, unbilled, ow.ou, now)
end

-- Auto top-up: when what the org wallet has free (monthly + top-up, after holds) falls
-- below the threshold, ask the billing system for a purchase — once per crossing, not
-- within the cooldown, at most max_per_period times a period. A crossing the cooldown or
-- the cap holds back stays pending: the first touch once they allow it, still below,
-- asks. State in bal 'atu':
-- "<asked for this crossing 0|1>|<last request ms>|<period>|<requests this period>".
local function auto_topup(ctx, now)
  local spec = ctx.atu
  if not spec or not ctx.org then return end
  local threshold, amount, enabled, cooldown, maxn = string.match(spec,
    '^(%d+)|(%d+)|(%d)|(%d+)|(%d+)$')
  if enabled ~= '1' then return end
  local free = avail_m(ctx.org) + avail_t(ctx.org)
  local st = ctx.org.extra.atu or '0|0|0|0'
  local below, last, per, count = string.match(st, '^(%d)|(%-?%d+)|(%-?%d+)|(%d+)$')
  last, per, count = tonumber(last), tonumber(per), tonumber(count)
  if per ~= ctx.pid then per = ctx.pid; count = 0 end
  local now_below = free < tonumber(threshold)
  local asked = '0'
  if now_below then
    asked = below
    if below == '0' and now - last >= tonumber(cooldown)
        and (tonumber(maxn) == 0 or count < tonumber(maxn)) then
      count = count + 1; last = now; asked = '1'
      local o = org_of(ctx)
      emit(ctx.bal, 'auto_topup.requested', 'auto_topup.requested:' .. o .. ':' .. ctx.meter
        .. ':' .. I(ctx.pid) .. ':' .. I(count), o, {meter = unesc(ctx.meter),
        amount = amount, threshold = threshold, available = I(free)}, now)
    end
  end
  local new = asked .. '|' .. I(last) .. '|' .. I(per) .. '|' .. I(count)
  if new ~= st then redis.call('HSET', ctx.bal, 'atu', new); ctx.org.extra.atu = new end
end

-- One call after every change of a wallet: org wallet events, auto top-up, then
-- reactivations when something came back (or a new period began), and deactivations
-- when a wallet ran dry (ctx.dry, set by the caller or by wallet_events).
after_change = function(ctx, now, refilled)
  overage_events(ctx, now)
  wallet_events(ctx, now)
  auto_topup(ctx, now)
  if refilled or (ctx.org and ctx.org.rolled) then reactivate_all(ctx, now) end
  if ctx.dry then deactivate_dry(ctx, now) end
end

-- The sweeper's second step: orgs of the shard that used overage in a period that has
-- ended, and were not touched since (index 'ovc': "<org>|<meter>" -> period end ms). Each
-- is touched as any call would (its period rolls, overage.period_closed bills the rest).
-- Returns how many were looked at.
local function close_periods(pre, now, limit, maxlen)
  local idx = pre .. 'ovc'
  local due = redis.call('ZRANGEBYSCORE', idx, '-inf', I(now), 'LIMIT', 0, limit)
  for k = 1, #due do
    local org_e, meter = string.match(due[k], '^(.*)|(.*)$')
    local cfg = pre .. 'org:' .. org_e
    if org_e and redis.call('EXISTS', cfg) == 1 then
      local bal = pre .. 'bal:' .. org_e .. ':' .. meter
      local gv = redis.call('HMGET', bal, 'gop', 'oub', 'w')
      if gv[1] then  -- a gauge's overage (gauge_overage_events): no wallet to roll
        local gp = period_of(now, math.max(1, N(redis.call('HGET', cfg, 'anchor'))))
        if tonumber(gv[1]) ~= gp then
          local w = gv[3] and wallet_unpack(gv[3])
          gauge_close(bal, org_e, meter, gv[1], N(gv[2]), w and w[11] or 0, now)
        end
      else
        local ctx = {cfg = cfg, bal = bal, te = '', se = '', meter = meter, kind = 'c',
          now = now, maxlen = maxlen}
        local ws = chain_load(ctx)
        chain_save(ctx, ws)
        after_change(ctx, now, false)
      end
    end
    -- after the touch: one that used overage again in a new period re-added itself
    if N(redis.call('ZSCORE', idx, due[k])) <= now then redis.call('ZREM', idx, due[k]) end
  end
  return #due
end
