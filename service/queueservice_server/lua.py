"""Every Lua script the service runs, in one place.

Scripts take their clock from Redis `TIME`, so every host stamps jobs with the
same clock. Job ids inside the sorted sets are local ids (the part after
`queue:`); job hash keys are the queue's job prefix plus that id.
"""

# Shared prologue: `now` in milliseconds from the Redis clock.
_NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
-- Waiting order: higher priority first, then FIFO by sequence. Formatted by
-- hand because Lua's default number-to-string keeps only 14 digits.
local function order(seq, priority)
  return string.format('%.0f', seq - priority * 1e12)
end
"""

# Creates one job, or returns the existing one for a known idempotency key.
# KEYS: waiting, delayed, counters, job, [idempotency]
# ARGV: local_id, msg, task, priority, delay_ms, due_at_ms, max_attempts,
#       timeout_ms, idempotency_ttl_ms, idempotency_key, job_prefix
# Returns {local_id, deduplicated (0/1), enqueued_at_ms}.
ENQUEUE = (
    _NOW
    + """
if KEYS[5] then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local at = redis.call('HGET', ARGV[11] .. existing, 'enqueued_at')
    return {existing, 1, at or now}
  end
end
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
local priority = tonumber(ARGV[4])
local due = tonumber(ARGV[6])
if tonumber(ARGV[5]) > 0 then due = now + tonumber(ARGV[5]) end
redis.call('HSET', KEYS[4], 'task', ARGV[3], 'msg', ARGV[2], 'priority', priority,
  'max_attempts', ARGV[7], 'timeout_ms', ARGV[8], 'attempts', 0, 'enqueued_at', now, 'seq', seq)
if ARGV[10] ~= '' then redis.call('HSET', KEYS[4], 'idempotency_key', ARGV[10]) end
if due > now then
  redis.call('HSET', KEYS[4], 'state', 'DELAYED', 'due_at', due)
  redis.call('ZADD', KEYS[2], due, ARGV[1])
else
  redis.call('HSET', KEYS[4], 'state', 'WAITING')
  redis.call('ZADD', KEYS[1], order(seq, priority), ARGV[1])
end
if KEYS[5] then
  redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[9])
end
return {ARGV[1], 0, now}
"""
)

# Takes up to `count` waiting jobs, highest priority first, into the active set
# under a lease, and returns their messages.
# KEYS: waiting, active
# ARGV: count, lease_ms, worker_id, job_prefix
TAKE = (
    _NOW
    + """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
redis.call('ZREM', KEYS[1], unpack(ids))
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[4] .. id
  local msg = redis.call('HGET', key, 'msg')
  if msg then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'state', 'ACTIVE', 'started_at', now, 'worker', ARGV[3])
    redis.call('HDEL', key, 'finished_at')
    out[#out + 1] = msg
  end
end
return out
"""
)

# Records an attempt's final outcome and applies retention to the finished set.
# KEYS: job, active, finished set (completed or failed), counters
# ARGV: local_id, state, error, keep, evicted_counter_field, job_prefix
# Returns 1, or 0 when the job was no longer held (reaped or cancelled).
FINISH = (
    _NOW
    + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', now, 'error', ARGV[3])
redis.call('ZADD', KEYS[3], now, ARGV[1])
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[3], 0, excess - 1)
  for _, id in ipairs(old) do redis.call('DEL', ARGV[6] .. id) end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, excess - 1)
  redis.call('HINCRBY', KEYS[4], ARGV[5], excess)
end
return 1
"""
)

# Puts a job that failed an attempt back for another one: into the delayed set
# until `due_at_ms`, or straight into waiting when that is not in the future.
# KEYS: job, active, delayed, waiting, counters
# ARGV: local_id, msg, due_at_ms, error
# Returns 1, or 0 when the job was no longer held.
RETRY = (
    _NOW
    + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local due = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'msg', ARGV[2], 'error', ARGV[4])
if due > now then
  redis.call('HSET', KEYS[1], 'state', 'DELAYED', 'due_at', due)
  redis.call('ZADD', KEYS[3], due, ARGV[1])
else
  local seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
  local priority = tonumber(redis.call('HGET', KEYS[1], 'priority') or '0')
  redis.call('HSET', KEYS[1], 'state', 'WAITING')
  redis.call('ZADD', KEYS[4], order(seq, priority), ARGV[1])
end
return 1
"""
)

# Moves every due job from the delayed set to waiting, in one atomic step.
# KEYS: delayed, waiting, counters
# ARGV: job_prefix, max_moved
# Returns how many moved.
PROMOTE = (
    _NOW
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  local priority = tonumber(redis.call('HGET', key, 'priority') or '0')
  redis.call('ZREM', KEYS[1], id)
  redis.call('HSET', key, 'state', 'WAITING')
  redis.call('ZADD', KEYS[2], order(seq, priority), id)
end
return #ids
"""
)
