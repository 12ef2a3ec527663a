-- A read's one round trip: the application's cached id, and a pending record with the
-- stream entry it points to, read atomically (the worker deletes the record before it
-- acknowledges, and the stream is trimmed only behind acknowledged entries, so a
-- record's entry is always there).
-- KEYS: 1 records hash, 2 stream, 3 application hash. ARGV: 1 the record's field.
-- Answers {app id or nil, record or nil, entry payload or nil}.
local app = redis.call('HGET', KEYS[3], 'id')
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return {app, false, false} end
local version = string.match(record, '^[^|]*')
local found = redis.call('XRANGE', KEYS[2], version, version)
if #found == 0 then return {app, record, false} end
return {app, record, found[1][2][2]}
