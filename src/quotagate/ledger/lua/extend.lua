-- extend.lua: Extend a hold — push its expiry out and/or hold more, all or nothing.
--
-- KEYS[1]  the hold's hash
-- ARGV[1]  now (ms)   ARGV[2] new TTL from now (ms)   ARGV[3] ledger MAXLEN
-- ARGV[4]  n additional charges   ARGV[5…] meter (escaped), amount pairs
-- Returns {'OK', decision ('G'|'D'), reason, silent (0|1), {meter, granted, …}, expires_at}
--      or {'ERR', code, field, msg}. Only a HELD hold within its TTL can be extended.
-- The extra amounts pass the same checks as Reserve (AI switch, feature, assistant, seat
-- cap, buckets); a denial changes nothing, not even the expiry.

local key = KEYS[1]
local now, ttl, maxlen, na = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])

local h = hold_read(key)
if not h then return {'ERR', 'NOT_FOUND', 'reservation_id', 'no such reservation'} end
local states = {C = 'committed', R = 'refunded', E = 'expired'}
if h.st == 'H' and now >= tonumber(h.exp) then
  return {'ERR', 'FAILED_PRECONDITION', 'reservation_id', 'reservation has expired'}
end
if h.st ~= 'H' then
  return {'ERR', 'FAILED_PRECONDITION', 'reservation_id', 'reservation is ' .. states[h.st]}
end

local extra = {}
for j = 1, na do
  local m, a = ARGV[3 + 2 * j], tonumber(ARGV[4 + 2 * j])
  local idx = nil
  for i = 1, h.n do if h.m[i] == m then idx = i end end
  if not idx then
    return {'ERR', 'INVALID_ARGUMENT', 'additional', 'meter is not part of this reservation'}
  end
  extra[idx] = (extra[idx] or 0) + a
end

local function deny(reason, silent)
  return {'OK', 'D', reason, silent and 1 or 0, {}, tonumber(h.exp)}
end

if na > 0 then
  local o = redis.call('HMGET', h.cfg, 'ai', 'f:' .. h.feat,
    'tf:' .. h.te .. ':' .. h.feat)
  if o[1] ~= '1' then return deny('ai', false) end
  if h.feat ~= '' and (o[2] == '0' or (h.te ~= '' and o[3] == '0')) then
    return deny('feature', false)
  end
  if h.ae ~= '' and redis.call('HGET', h.cfg, 'as:' .. h.ae) ~= '1' then
    return deny('inactive', true)
  end
end

local ctxs, wss = {}, {}
for i, a in pairs(extra) do
  local ctx = hold_ctx(h, i, now, maxlen)
  local ws = chain_load(ctx)
  ctxs[i], wss[i] = ctx, ws
  local avail = chain_available(ctx, ws)
  if h.ae ~= '' and avail <= 0 and not QUIET[h.m[i]] then return deny('inactive', true) end
  local room = seat_room(ws, h.se, seat_limit(h.cfg, h.se, h.m[i], ctx))
  if room >= 0 and room < a and room < avail then return deny('seat', false) end
  if avail < a then
    if redis.call('HEXISTS', h.cfg, 'oc:' .. h.m[i]) == 1 then return deny('overage', false) end
    return deny('insufficient', false)
  end
  -- Holding the chain's last tokens: the assistants on it are deactivated (after_change).
  if avail <= a then ctx.dry = true end
end

local expires = now + ttl
local fields = {'exp', I(expires)}
local granted = {}
for i = 1, h.n do
  local a = extra[i]
  if a then
    local ctx, ws = ctxs[i], wss[i]
    local takes = chain_hold(ctx, ws, a)
    if h.se ~= '' and ws[1].level == 'S' then
      local add = a
      if ws[1].p ~= tonumber(h.hp[i]) then
        -- held since an earlier period: the whole hold counts against this period's
        -- seat cap from now on, as its Commit will, and its release takes all of it off
        add = add + N(h.g[i])
        fields[#fields + 1] = hf('hp', i); fields[#fields + 1] = I(ws[1].p)
      end
      ws[1].ch = ws[1].ch + add; ws[1].dirty = true
    end
    chain_save(ctx, ws)
    after_change(ctx, now, false)
    local merged = takes_encode(takes_merge(takes_decode(h.t[i]), takes))
    fields[#fields + 1] = hf('t', i); fields[#fields + 1] = merged
    fields[#fields + 1] = hf('g', i); fields[#fields + 1] = I(N(h.g[i]) + a)
    granted[#granted + 1] = h.m[i]; granted[#granted + 1] = a
    spend_entry(h.pre .. 'ledger', maxlen, 'extend', h, h.m[i], a, takes_encode(takes), '',
      h.lbl, now, ctx.anchor)
  end
end
redis.call('HSET', key, unpack(fields))
redis.call('ZADD', h.pre .. 'exp', I(expires), h.rid)
return {'OK', 'G', '', 0, granted, expires}
