-- Starts the indexer's catch-up after the stream was trimmed past it: the gap mark
-- becomes the catch-up mark, and the index group is made anew just before the stream's
-- first entry, so that it reads every entry still there (and forgets pending entries
-- that are gone). Everything before that entry was persisted before it was trimmed, so
-- MySQL holds it. The SET comes first: at `maxmemory` Redis refuses it (and with it,
-- the rest of the script) before anything has changed.
-- KEYS: 1 gap mark, 2 catch-up mark, 3 stream. ARGV: 1 group.
-- Answers where the catch-up starts, or nil without a gap.
local from = redis.call('GET', KEYS[1])
if not from then return false end
redis.call('SET', KEYS[2], from)
redis.call('DEL', KEYS[1])
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
local start = '$'
if #first > 0 then
  local ms, seq = string.match(first[1][1], '^(%d+)-(%d+)$')
  if tonumber(seq) > 0 then
    start = ms .. '-' .. string.format('%.0f', tonumber(seq) - 1)
  else
    start = string.format('%.0f', tonumber(ms) - 1) .. '-18446744073709551615'
  end
end
redis.call('XGROUP', 'DESTROY', KEYS[3], ARGV[1])
redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[1], start, 'MKSTREAM')
return from
