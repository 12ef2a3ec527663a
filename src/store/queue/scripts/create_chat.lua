-- Allocates a chat number and queues the chat, atomically.
-- KEYS: 1 application hash, 2 chat counter, 3 stream, 4 chat records hash,
--       5 message counters hash, 6 idempotency key (the application hash when none),
--       7 memory flag.
-- ARGV: 1 token, 2 accepted_us, 3 has_title (0/1), 4 title, 5 fingerprint ('' when no
--       idempotency key), 6 idempotency TTL (s), 7 max stream entries.
-- Answers {status, number, entry id or the idempotency record}; status is ok, replay,
-- noapp, nochatseq or full.
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
if ARGV[5] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {'replay', 0, prior} end
end
if redis.call('EXISTS', KEYS[7]) == 1 or redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[7]) then
  return {'full', 0, ''}
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'nochatseq', 0, ''} end
local n = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[3], '*', 'e',
  'c|' .. app .. '|' .. ARGV[1] .. '|' .. n .. '|0|' .. ARGV[2] .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('HSET', KEYS[4], n, id .. '|0')
redis.call('HSET', KEYS[5], n, 0)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[6], ARGV[5] .. '|' .. n .. '|' .. ARGV[2], 'EX', ARGV[6])
end
return {'ok', n, id}
