-- heartbeat_batch.lua: record heartbeats for many connections of one shard
-- (or, on a standalone Redis, of any shards): the batch endpoint's pairs, and
-- single heartbeats that arrived together (store/coalesce.rs).
--
-- KEYS     the connection set (c) of each pair's session, in pair order (a
--          session may appear more than once); then the metadata (m) of the
--          session of each pair whose caller must own it, in ARGV's order
-- ARGV     clock offset ms, window ms, one connection id per pair; then, for
--          each pair whose caller must own its session (a user's heartbeat,
--          over HTTP or a WebSocket), its 1-based position and the user.
--          Services and admins add nothing.
-- Returns  {now ms, r1, r2, ...}: one number per refused pair (in no
--          particular order), 4 x its position + why: 1 the connection is
--          unknown or dead, 2 the session has no owner (for a user: no such
--          session), 3 another user owns it.
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
-- A user's pairs are checked against the owner first; the pairs left are
-- grouped by connection set, so that connections of one session cost one
-- ZMSCORE and one ZADD between them, not two calls each.
local sets, order = {}, {}
for i = 1, n do
  local why = 0
  local owner = must[i]
  if owner then
    local own = redis.call('HGET', owner[1], 'own')
    if not own then why = 2 elseif own ~= owner[2] then why = 3 end
  end
  if why > 0 then
    refuse(i, why)
  else
    local set = sets[KEYS[i]]
    if not set then
      set = {}
      sets[KEYS[i]] = set
      order[#order + 1] = KEYS[i]
    end
    set[#set + 1] = i
  end
end
-- Arguments of one call stay well below Lua's unpack limit (8,000).
local CHUNK = 512
for _, key in ipairs(order) do
  local set = sets[key]
  if #set == 1 then
    -- The common case (one connection a session): no tables to build.
    local i = set[1]
    local hb = redis.call('ZSCORE', key, ARGV[i + 2])
    if not hb or tonumber(hb) <= cutoff then
      refuse(i, 1)
    else
      redis.call('ZADD', key, now, ARGV[i + 2])
    end
  else
    for first = 1, #set, CHUNK do
      local last = math.min(first + CHUNK - 1, #set)
      local ids = {}
      for j = first, last do ids[#ids + 1] = ARGV[set[j] + 2] end
      local scores = redis.call('ZMSCORE', key, unpack(ids))
      local zadd = {}
      for k, id in ipairs(ids) do
        local hb = scores[k]
        if not hb or tonumber(hb) <= cutoff then
          refuse(set[first + k - 1], 1)
        else
          zadd[#zadd + 1] = now
          zadd[#zadd + 1] = id
        end
      end
      if #zadd > 0 then redis.call('ZADD', key, unpack(zadd)) end
    end
  end
end
return refused
