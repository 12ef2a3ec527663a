-- Deletes each pending record whose version is the one just persisted; a record that a
-- later update has replaced stays until that update is persisted too.
-- KEYS: the records hashes (one per record, repeated as needed; all of one shard).
-- ARGV: for the i-th key, 2i-1 the record's field and 2i the persisted version.
-- Answers how many records were deleted.
local released = 0
for i, key in ipairs(KEYS) do
  local field, version = ARGV[2 * i - 1], ARGV[2 * i]
  local record = redis.call('HGET', key, field)
  if record and string.sub(record, 1, #version + 1) == version .. '|' then
    redis.call('HDEL', key, field)
    released = released + 1
  end
end
return released
