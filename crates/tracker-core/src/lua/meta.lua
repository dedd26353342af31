-- meta.lua: helpers on a session's metadata alone, prepended to every shard
-- script (before common.lua) and to the scripts that read one session's
-- state without the shard's keys (session_state.lua). The metadata fields
-- are described in common.lua.

-- Integral ms as a decimal string: tostring() would switch to exponent form.
local function ms(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
end

local function load_meta(S)
  local flat = redis.call('HGETALL', S.m)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

-- The reported state for a session with n connections; nil for a session
-- without resource and without connections (it is counted nowhere).
local function state_of(m, n)
  if m.res ~= '1' then
    if n > 0 then return 'unknown' end
    return nil
  end
  if m.ks == 'terminated' then return 'terminated' end
  if m.ph == 'h' then return 'hibernating' end
  if m.ph == 'w' then return 'waking' end
  if m.ks == 'hibernated' then return 'hibernated' end
  if n > 0 then return 'running' end
  return 'idle'
end

local function max_deadline(m)
  if m.md and m.rs then return tonumber(m.rs) + tonumber(m.md) end
  return nil
end

-- Whether the tracker knows anything of a session with n connections in its
-- set: what forgetting keeps (the deleted uid, the newest connection's
-- start) is no knowledge of a session.
local function known(m, n)
  if n > 0 then return true end
  for f in pairs(m) do
    if f ~= 'du' and f ~= 'lc' then return true end
  end
  return false
end

-- The deadline (ms) of the current running period whose clients are to be
-- warned of a hibernation for max duration, '' if none.
local function clients_warning(m)
  if m.wn and not m.wq and m.rs and m.ks == 'running' and m.wn == ms(max_deadline(m) or -1) then
    return m.wn
  end
  return ''
end
