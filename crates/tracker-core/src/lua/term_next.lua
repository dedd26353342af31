-- term_next.lua: a fresh leader term, greater than any handed out before.
--
-- KEYS[1]  the term sequence
-- ARGV     clock offset ms, a floor: the new term is above it (the newest term
--          a shard has seen, in case the sequence lost its data while shards
--          did not)
-- Returns  the new term.
-- Atomic   increment with the floor, so two callers never get the same term.
--          A missing sequence is new, or lost with the data; the shards may
--          have lost theirs too, so nothing remembers the terms handed out
--          before. It then starts at the clock (ms): terms grow by one per
--          leader change, far slower than the clock, so every term handed
--          out before the loss is below it.

local floor = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
  if now > floor then floor = now end
end
local term = redis.call('INCR', KEYS[1])
if term <= floor then
  term = floor + 1
  redis.call('SET', KEYS[1], string.format('%.0f', term))
end
return term
