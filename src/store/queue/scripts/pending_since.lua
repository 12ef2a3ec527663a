-- A chat's pending messages written after a given stream entry (a subscriber resuming
-- from its last event), each with the entry it points to.
-- KEYS: 1 the chat's message records hash, 2 stream.
-- ARGV: 1 the entry id to resume after (`ms-seq`), 2 most pending records to look at.
-- Answers {'busy'} when the chat has more pending records than that (a backlog: the
-- caller retries later), else {'ok', number, record, entry or nil, ...} for each record
-- whose version is later.
local function later(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[2]) then return {'busy'} end
local found = {'ok'}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local record = all[i + 1]
  local version = string.match(record, '^[^|]*')
  if later(version, ARGV[1]) then
    local entry = redis.call('XRANGE', KEYS[2], version, version)
    found[#found + 1] = all[i]
    found[#found + 1] = record
    if #entry > 0 then found[#found + 1] = entry[1][2][2] else found[#found + 1] = false end
  end
end
return found
