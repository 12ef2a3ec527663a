-- Deletes each pending record whose version is the one just persisted; a record that a
-- later update has replaced stays until that update is persisted too.
-- KEYS: the records hashes, each once (all of one shard).
-- ARGV: for each key in turn, the number n of its records, then n pairs of the record's
--       field and the persisted version.
-- A hash of several records takes one HMGET and at most one HDEL for all of them.
-- Answers how many records were deleted.

-- The record starts with `version|`.
local function holds(record, version)
  return record and string.byte(record, #version + 1) == 124
    and string.sub(record, 1, #version) == version
end

local released, at = 0, 1
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  if n == 1 then
    local field = ARGV[at + 1]
    if holds(redis.call('HGET', key, field), ARGV[at + 2]) then
      released = released + redis.call('HDEL', key, field)
    end
  else
    local fields = {}
    for j = 1, n do fields[j] = ARGV[at + 2 * j - 1] end
    local records = redis.call('HMGET', key, unpack(fields))
    local gone = {}
    for j = 1, n do
      if holds(records[j], ARGV[at + 2 * j]) then gone[#gone + 1] = fields[j] end
    end
    if #gone > 0 then
      released = released + redis.call('HDEL', key, unpack(gone))
    end
  end
  at = at + 2 * n + 1
end
return released
