-- heartbeat_batch.lua: record heartbeats for many connections of one shard
-- (or, on a standalone Redis, of any shards): the batch endpoint's pairs, and
-- single heartbeats that arrived together (store/coalesce.rs).
--
-- KEYS     the connection set (c) of each pair's session, in pair order, the
--          pairs of one session next to each other (they are checked
--          together); then the metadata (m) of the session of each pair whose
--          caller must own it, in ARGV's order
-- ARGV     clock offset ms, window ms, one connection id per pair; then, for
--          each pair whose caller must own its session (a user's heartbeat,
--          over HTTP or a WebSocket), its 1-based position and the user.
--          Services and admins add nothing.
-- Returns  {now ms, r1, r2, ...}: one number per refused pair (not in pair
--          order: a run's owner refusals come before its dead connections),
--          4 x its position + why: 1 the connection is unknown or dead, 2 the
--          session has no owner (for a user: no such session), 3 another
--          user owns it.
-- Atomic   each pair's liveness check with its update: a heartbeat that lands
--          after the window or after the sweep never brings the connection
--          back; and a user's check of the owner with it, instead of a session
--          view of its own before it. The sweep index keeps its older score: a
--          lower bound is all the sweep needs.
-- (Not a shard script: it needs none of common.lua.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local cutoff = now - tonumber(ARGV[2])
local owned = #ARGV - 2 - #KEYS
local n = #KEYS - owned
local must = {}
for j = 1, owned do
  must[tonumber(ARGV[1 + n + 2 * j])] = { KEYS[n + j], ARGV[2 + n + 2 * j] }
end
local refused = { now }
local function refuse(i, why) refused[#refused + 1] = 4 * i + why end
-- A user's pair is refused unless its session is the user's.
local function owner_ok(i)
  local owner = must[i]
  if not owner then return true end
  local own = redis.call('HGET', owner[1], 'own')
  if not own then refuse(i, 2) elseif own ~= owner[2] then refuse(i, 3) end
  return own == owner[2]
end
-- Pairs of one connection set come together (the caller sorts them): one
-- ZMSCORE and one ZADD for a run of them, in chunks well below Lua's unpack
-- limit (8,000), instead of two calls each.
local CHUNK = 512
local first = 1
while first <= n do
  local key = KEYS[first]
  local last = first
  while last < n and KEYS[last + 1] == key do last = last + 1 end
  if last == first then
    -- The common case (one connection a session): no tables to build.
    if owner_ok(first) then
      local cid = ARGV[first + 2]
      local hb = redis.call('ZSCORE', key, cid)
      if not hb or tonumber(hb) <= cutoff then
        refuse(first, 1)
      else
        redis.call('ZADD', key, now, cid)
      end
    end
  else
    local pos = {}
    for i = first, last do
      if owner_ok(i) then pos[#pos + 1] = i end
    end
    for from = 1, #pos, CHUNK do
      local ids = {}
      for j = from, math.min(from + CHUNK - 1, #pos) do ids[#ids + 1] = ARGV[pos[j] + 2] end
      local scores = redis.call('ZMSCORE', key, unpack(ids))
      local zadd = {}
      for k, id in ipairs(ids) do
        local hb = scores[k]
        if not hb or tonumber(hb) <= cutoff then
          refuse(pos[from + k - 1], 1)
        else
          zadd[#zadd + 1] = now
          zadd[#zadd + 1] = id
        end
      end
      if #zadd > 0 then redis.call('ZADD', key, unpack(zadd)) end
    end
  end
  first = last + 1
end
return refused
