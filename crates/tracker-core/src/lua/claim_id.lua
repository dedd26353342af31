-- claim_id.lua: take a connection id for one connection, for ever.
--
-- KEYS[1]  the id's bucket (registered connections' entries, a field each)
-- KEYS[2]  the id's own entry (a claim not yet registered, or an entry of
--          an older version)
-- KEYS[3…] the sets of ended ids that may still hold it (every period of
--          the id retention, and one more on each side)
-- ARGV     clock offset ms (unused), session id, user id, ttl ms of a claim
--          no registration follows, the connection id, the id's 16 bytes
-- Returns  'new' when taken now; 'claimed' when this session and user took it
--          before without a registration being recorded (a retry after a
--          failure); 'registered' when this session registered it (only a
--          replay of that live connection by its user is possible); 'conflict'
--          when another session or user took it, or its connection ended.
-- Atomic   check and take, so two registrations never own one id. The entry
--          also tells GET /v1/connections/{id} which shard to ask.

local sid, uid = ARGV[2], ARGV[3]
local v = redis.call('HGET', KEYS[1], ARGV[5]) or redis.call('GET', KEYS[2])
if not v then
  for i = 3, #KEYS do
    if redis.call('SISMEMBER', KEYS[i], ARGV[6]) == 1 then return 'conflict' end
  end
  -- Its own key, with an expiry: a claim no registration follows goes away.
  redis.call('SET', KEYS[2], 'c|' .. sid .. '|' .. uid, 'PX', ARGV[4])
  return 'new'
end
if v == 'c|' .. sid .. '|' .. uid then return 'claimed' end
-- A registered entry names the session ('r|<session>'; an older version's
-- also the user): only a replay of that live connection is possible, and
-- the registering script refuses it to any other user.
if v == 'r|' .. sid or v == 'r|' .. sid .. '|' .. uid then return 'registered' end
return 'conflict'
