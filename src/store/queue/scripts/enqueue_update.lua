-- Queues the whole new state of a chat or message and makes it the pending record. A
-- message update also moves its chat's update mark to the new entry, for `ARGV[5]`
-- seconds (longer than any process keeps a copy of a persisted message).
-- KEYS: 1 stream, 2 records hash, 3 memory flag, 4 (messages only) the chat's update mark.
-- ARGV: 1 the entry, 2 messages_count (the record's only field besides its version,
--       the new entry's id), 3 max stream entries, 4 the record's field (its number),
--       5 (messages only) the mark's lifetime in seconds.
-- Answers the entry id, or `full`.
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'full'
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[4], id .. '|' .. ARGV[2])
if KEYS[4] then redis.call('SET', KEYS[4], id, 'EX', ARGV[5]) end
return id
