-- term_begin.lua: a new leader fences its predecessors out of one shard.
--
-- KEYS[1]  the shard's term
-- ARGV     clock offset ms (unused), the new leader's term
-- Returns  the term stored before this call (0 if none).
-- Atomic   compare-and-raise: the stored term only grows, so once a term is
--          here every write of an older one is refused (see common.lua's fenced).

local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
local term = tonumber(ARGV[2])
if term > stored then redis.call('SET', KEYS[1], string.format('%.0f', term)) end
return stored
