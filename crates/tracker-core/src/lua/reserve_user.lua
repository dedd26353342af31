-- reserve_user.lua: take one of a user's connection slots.
--
-- KEYS[1]  user shard base "<prefix>:{u<n>}"
-- ARGV     clock offset ms, user id, member "<session id>/<connection id>",
--          limit, grace ms
-- Returns  {'ok'} when reserved (or already held by this member);
--          {'full', member, member, ...} at the limit, listing the members older
--          than the grace period, which the caller may verify and release.
-- Atomic   count and insert: concurrent registrations of one user never hold
--          more than `limit` slots. The slot is taken before the connection is
--          registered (another slot, another script), so a crash between the two
--          can only over-count, which the verification above repairs.

local key = B .. ':user:' .. ARGV[2]
local member, limit, grace = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
if redis.call('ZSCORE', key, member) then return { 'ok' } end
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member)
  return { 'ok' }
end
local out = { 'full' }
for _, v in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', ms(now - grace))) do
  out[#out + 1] = v
end
return out
