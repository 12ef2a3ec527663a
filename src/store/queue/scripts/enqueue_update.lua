-- Queues the whole new state of a chat or message and makes it the pending record.
-- KEYS: 1 stream, 2 records hash, 3 memory flag.
-- ARGV: 1 the entry, 2 messages_count (the record's only field besides its version,
--       the new entry's id), 3 max stream entries, 4 the record's field (its number).
-- Answers the entry id, or `full`.
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'full'
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[4], id .. '|' .. ARGV[2])
return id
