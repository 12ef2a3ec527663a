-- Allocates a message number in a chat and queues the message, atomically.
-- KEYS: 1 application hash, 2 chat counter, 3 message counters hash, 4 stream,
--       5 the chat's message records hash, 6 idempotency key (the application hash
--       when none), 7 memory flag.
-- ARGV: 1 token, 2 chat number, 3 body, 4 accepted_us, 5 fingerprint ('' when no
--       idempotency key), 6 idempotency TTL (s), 7 max stream entries.
-- Answers {status, number, entry id or the idempotency record}; status is ok, replay,
-- noapp, nochatseq, nochat, nomsgseq or full.
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
local chats = redis.call('GET', KEYS[2])
if not chats then return {'nochatseq', 0, ''} end
if tonumber(ARGV[2]) > tonumber(chats) then return {'nochat', 0, ''} end
if ARGV[5] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {'replay', 0, prior} end
end
if redis.call('EXISTS', KEYS[7]) == 1 or redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[7]) then
  return {'full', 0, ''}
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then return {'nomsgseq', 0, ''} end
local n = redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
local id = redis.call('XADD', KEYS[4], '*', 'e',
  'm|' .. app .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. n .. '|' .. ARGV[4] .. '|' .. ARGV[4] .. '|1|' .. ARGV[3])
redis.call('HSET', KEYS[5], n, id .. '|0')
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[6], ARGV[5] .. '|' .. n .. '|' .. ARGV[4], 'EX', ARGV[6])
end
return {'ok', n, id}
