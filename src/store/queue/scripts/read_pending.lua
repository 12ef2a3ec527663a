-- A read's one round trip: the application's cached id, and a pending record with the
-- stream entry it points to, read atomically (the worker deletes the record before it
-- acknowledges, and the stream is trimmed only behind acknowledged entries, so a
-- record's entry is always there). For a message, also the chat's update mark (the entry
-- id of its latest message update, while it lasts), which says whether a copy of a
-- persisted message read earlier may have changed since.
-- KEYS: 1 records hash, 2 stream, 3 application hash, 4 (messages only) update mark.
-- ARGV: 1 the record's field.
-- Answers {app id or nil, record or nil, entry payload or nil, update mark or nil}.
local app = redis.call('HGET', KEYS[3], 'id')
local mark = false
if KEYS[4] then mark = redis.call('GET', KEYS[4]) end
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return {app, false, false, mark} end
local version = string.match(record, '^[^|]*')
local found = redis.call('XRANGE', KEYS[2], version, version)
if #found == 0 then return {app, record, false, mark} end
return {app, record, found[1][2][2], mark}
