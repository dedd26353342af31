-- term_next.lua: a fresh leader term, greater than any handed out before.
--
-- KEYS[1]  the term sequence
-- ARGV     clock offset ms (unused), a floor: the new term is above it (the newest term a shard has
--          seen, in case the sequence lost its data while shards did not)
-- Returns  the new term.
-- Atomic   increment with the floor, so two callers never get the same term.

local floor = tonumber(ARGV[2])
local term = redis.call('INCR', KEYS[1])
if term <= floor then
  term = floor + 1
  redis.call('SET', KEYS[1], string.format('%.0f', term))
end
return term
