-- A list page's one round trip: the application's cached id, the parent's counter (the
-- last number handed out: every number up to it was accepted), and the pending records
-- of the page's numbers with the stream entries they point to.
-- KEYS: 1 application hash, 2 counter (a string, or a hash when ARGV[1] is set),
--       3 records hash, 4 stream, 5 the application's chat counter, 6 (messages only)
--       the chat's update mark (see read_pending.lua).
-- ARGV: 1 the counter's field ('' for a string counter), 2 first number of the page,
--       3 `asc` or `desc`, 4 most numbers, 5 the chat whose existence to check ('' for
--       none).
-- Answers {app id or nil, last number or nil, chat exists (0 no, 1 yes, 2 unknown: the
-- chat counter is missing), {number, record, entry or nil, ...}, update mark or nil}.
local app = redis.call('HGET', KEYS[1], 'id')
local mark = false
if KEYS[6] then mark = redis.call('GET', KEYS[6]) end
local last
if ARGV[1] == '' then
  last = redis.call('GET', KEYS[2])
else
  last = redis.call('HGET', KEYS[2], ARGV[1])
end
local chat_exists = 1
if ARGV[5] ~= '' then
  local chats = redis.call('GET', KEYS[5])
  if not chats then chat_exists = 2
  elseif tonumber(chats) < tonumber(ARGV[5]) then chat_exists = 0 end
end
if not last then return {app, false, chat_exists, {}, mark} end
last = tonumber(last)
local first, limit = tonumber(ARGV[2]), tonumber(ARGV[4])
local numbers = {}
if ARGV[3] == 'asc' then
  local n = first
  while n <= last and #numbers < limit do numbers[#numbers + 1] = n; n = n + 1 end
else
  local n = math.min(first, last)
  while n >= 1 and #numbers < limit do numbers[#numbers + 1] = n; n = n - 1 end
end
local found = {}
if #numbers > 0 then
  local records = redis.call('HMGET', KEYS[3], unpack(numbers))
  for i, record in ipairs(records) do
    if record then
      local version = string.match(record, '^[^|]*')
      local entry = redis.call('XRANGE', KEYS[4], version, version)
      found[#found + 1] = numbers[i]
      found[#found + 1] = record
      if #entry > 0 then found[#found + 1] = entry[1][2][2] else found[#found + 1] = false end
    end
  end
end
return {app, last, chat_exists, found, mark}
