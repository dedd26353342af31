-- reserve_user.lua: take one of a user's connection slots.
--
-- KEYS[1]  the user's slot set
-- ARGV     clock offset ms, member "<session id>/<connection id>", limit, grace ms
-- Returns  {'ok'} when reserved (or already held by this member);
--          {'full', member, member, ...} at the limit, listing the members older
--          than the grace period, which the caller may verify and release.
-- Atomic   count and insert: concurrent registrations of one user never hold
--          more than `limit` slots. The slot is taken before the connection is
--          registered (another slot, another script), so a crash between the two
--          can only over-count, which the verification above repairs; a slot
--          whose connection ended is released when the connection is archived.
-- (Not a shard script: it does not use common.lua.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local member, limit, grace = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[1], member) then return { 'ok' } end
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, member)
  return { 'ok' }
end
local out = { 'full' }
for _, v in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - grace))) do
  out[#out + 1] = v
end
return out
