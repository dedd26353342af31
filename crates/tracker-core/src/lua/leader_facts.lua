-- leader_facts.lua: the leader tells readers of one shard what holds back its
-- decisions there (the explain view reads it).
--
-- KEYS     the shard keys (common.lua), then the shard's leader facts (HASH:
--          t term, gu no hibernation before (ms), dr '1' in dry run, at
--          written at (ms))
-- ARGV     clock offset ms, leader term, guard left ms (0: none), dry run
--          ('1' or '0'), lifetime ms
-- Returns  1 if written; -1 if fenced (a newer leader wrote here).
-- Atomic   the fencing check with the write: a replaced leader never
--          overwrites its successor's facts. They expire after their
--          lifetime, so a dead leader's guard or dry run is not reported for
--          long; the live leader writes them again every tick.

local K_FACTS = KEYS[SHARD_KEYS + 1]
local term, guard, dry, life = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if fenced(term) then return -1 end
local now = now_ms()
redis.call('DEL', K_FACTS)
redis.call('HSET', K_FACTS, 't', ms(term), 'gu', ms(now + math.max(guard, 0)), 'at', ms(now))
if dry == '1' then redis.call('HSET', K_FACTS, 'dr', '1') end
redis.call('PEXPIRE', K_FACTS, life)
return 1
