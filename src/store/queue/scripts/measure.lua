-- Measures one shard's backlog against its bounds on the Redis that holds the shard, and
-- (when asked) sets or clears the shard's memory flag, which the create and update
-- scripts check.
-- The flag expires on its own: one left by a worker that died would otherwise refuse
-- writes for ever. At `maxmemory` Redis may refuse to set it; the check below still
-- answers `full`, and the next measure tries again.
-- KEYS: 1 stream, 2 memory flag. ARGV: 1 memory limit in bytes ('' for 90% of
-- `maxmemory`, none without one), 2 max stream entries, 3 flag TTL (s), 4 `1` to set
-- or clear the flag, `0` to only measure.
-- Answers {entries, used_memory, memory limit (0: none), full (0/1)}.
local info = redis.call('INFO', 'memory')
local used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
local maxmemory = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
local limit = tonumber(ARGV[1])
if not limit then
  if maxmemory > 0 then limit = math.floor(maxmemory / 10) * 9 else limit = 0 end
end
local entries = redis.call('XLEN', KEYS[1])
local memory_full = limit > 0 and used >= limit
if ARGV[4] == '1' then
  if memory_full then
    redis.pcall('SET', KEYS[2], 1, 'EX', ARGV[3])
  else
    redis.call('DEL', KEYS[2])
  end
end
local full = 0
if memory_full or entries >= tonumber(ARGV[2]) then full = 1 end
return {entries, used, limit, full}
