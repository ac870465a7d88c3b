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
-- Puts job `id` (hash `key`) into waiting. With `seq` nil it joins the back of
-- its priority band; with its original seq it goes back to where it stood.
local function to_waiting(waiting, counters, key, id, seq)
  if not seq then
    seq = redis.call('HINCRBY', counters, 'seq', 1)
    redis.call('HSET', key, 'seq', seq)
  end
  local priority = tonumber(redis.call('HGET', key, 'priority') or '0')
  redis.call('HSET', key, 'state', 'WAITING', 'ready_at', now)
  redis.call('ZADD', waiting, order(seq, priority), id)
end
-- Keeps the newest `keep` members of a finished set; older job records are
-- deleted and counted under `field`, never silently gone.
local function retain(set, keep, counters, field, prefix)
  local excess = redis.call('ZCARD', set) - keep
  if excess > 0 then
    local old = redis.call('ZRANGE', set, 0, excess - 1)
    for _, id in ipairs(old) do redis.call('DEL', prefix .. id) end
    redis.call('ZREMRANGEBYRANK', set, 0, excess - 1)
    redis.call('HINCRBY', counters, field, excess)
  end
end
local function fail(key, id, failed, error, keep, counters, prefix)
  redis.call('HSET', key, 'state', 'FAILED', 'finished_at', now, 'error', error)
  redis.call('ZADD', failed, now, id)
  retain(failed, keep, counters, 'evicted_failed', prefix)
end
"""

# Creates a batch of jobs of one queue, or for a known idempotency key returns
# the first job of that key. The batch comes as one msgpack argument, so a
# thousand jobs cost one command to parse rather than fifteen thousand.
# KEYS: waiting, delayed, counters
# ARGV: job_prefix, idempotency_prefix, idempotency_ttl_ms, jobs: a msgpack list of
#       [local_id, msg, task, priority, delay_ms, due_at_ms, max_attempts, timeout_ms, idempotency_key]
# Returns per job: local id (the first job's, for a known key), deduplicated (0/1), enqueued_at_ms.
ENQUEUE = (
    _NOW
    + """
local jobs = cmsgpack.unpack(ARGV[4])
local out = {}
local seq = redis.call('HINCRBY', KEYS[3], 'seq', #jobs) - #jobs
for _, job in ipairs(jobs) do
  local id, msg, task, priority, delay, due, max_attempts, timeout, idem = unpack(job)
  local idem_key, existing = nil, nil
  if idem ~= '' then
    idem_key = ARGV[2] .. idem
    existing = redis.call('GET', idem_key)
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 1
    out[#out + 1] = redis.call('HGET', ARGV[1] .. existing, 'enqueued_at') or now
  else
    seq = seq + 1
    local key = ARGV[1] .. id
    if delay > 0 then due = now + delay end
    redis.call('HSET', key, 'task', task, 'msg', msg, 'priority', priority, 'max_attempts', max_attempts,
      'timeout_ms', timeout, 'attempts', 0, 'enqueued_at', now, 'ready_at', now, 'seq', seq)
    if idem_key then
      redis.call('HSET', key, 'idempotency_key', idem)
      redis.call('SET', idem_key, id, 'PX', ARGV[3])
    end
    if due > now then
      redis.call('HSET', key, 'state', 'DELAYED', 'due_at', due)
      redis.call('ZADD', KEYS[2], due, id)
    else
      redis.call('HSET', key, 'state', 'WAITING')
      redis.call('ZADD', KEYS[1], order(seq, priority), id)
    end
    out[#out + 1] = id
    out[#out + 1] = 0
    out[#out + 1] = now
  end
end
return out
"""
)

# Takes up to `count` waiting jobs, highest priority first, into the active set
# under a lease. With a rate limit, takes only as many as the sliding window
# has room for, and otherwise says how long until a token frees up: a worker
# waits for a token, it never takes a job to put it back. A member with no
# job record (written by hand) is failed with an error, not dropped.
# KEYS: waiting, active, limiter, counters, failed
# ARGV: count, lease_ms, worker_id, job_prefix, limit_max, limit_window_ms,
#       limit_slack_ms, keep_failed
# Returns {now, wait_ms, then per job: local id, msg, ready_at, attempt, task}.
TAKE = (
    _NOW
    + """
local count = tonumber(ARGV[1])
local limit = tonumber(ARGV[5])
if limit > 0 then
  local window = tonumber(ARGV[6])
  -- A token frees a little after its window so that starts, which follow
  -- takes by a few ms, never exceed the limit in any window either.
  local span = window + tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - span))
  local used = redis.call('ZCARD', KEYS[3])
  if used >= limit then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {now, tonumber(oldest[2]) + span - now + 1}
  end
  count = math.min(count, limit - used)
end
local ids = redis.call('ZRANGE', KEYS[1], 0, count - 1)
local out = {now, 0}
if #ids == 0 then return out end
redis.call('ZREM', KEYS[1], unpack(ids))
local leases, takes = {}, {}
local until_ms = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  local key = ARGV[4] .. id
  local job = redis.call('HMGET', key, 'msg', 'ready_at', 'task', 'attempts')
  if job[1] then
    leases[#leases + 1] = until_ms
    leases[#leases + 1] = id
    local attempt = tonumber(job[4] or '0') + 1
    redis.call('HSET', key, 'state', 'ACTIVE', 'attempts', attempt, 'started_at', now, 'worker', ARGV[3],
      'finished_at', '')
    if limit > 0 then
      takes[#takes + 1] = now
      takes[#takes + 1] = id .. ':' .. attempt
    end
    out[#out + 1] = id
    out[#out + 1] = job[1]
    out[#out + 1] = job[2] or now
    out[#out + 1] = attempt
    out[#out + 1] = job[3] or ''
  else
    redis.call('HSET', key, 'task', '', 'enqueued_at', now, 'attempts', 0)
    fail(key, id, KEYS[5], 'no job record: a member was written into the waiting set by hand',
      tonumber(ARGV[8]), KEYS[4], ARGV[4])
  end
end
if #leases > 0 then redis.call('ZADD', KEYS[2], unpack(leases)) end
if #takes > 0 then redis.call('ZADD', KEYS[3], unpack(takes)) end
return out
"""
)

# Records a batch of finished attempts (one queue): outcome and times on the
# job record, the finished sets with retention, a retry's next move, one
# timings stream entry per attempt (numbered by counters.timings, so a reader
# can tell how many it missed), the batch's per-minute figures, and running
# totals in counters (total_n, total_completed, total_failed, total_retried).
# An attempt whose job is no longer held (reaped meanwhile) changes no job.
# KEYS: active, completed, failed, delayed, waiting, counters, timings
# ARGV: job_prefix, minute_prefix, keep_completed, keep_failed, stream_maxlen,
#       minute_ttl_s, worker_id, attempts (msgpack list of timings.attempt_args),
#       figures (msgpack [wait_max, proc_max, total_max, {field: HINCRBY amount}])
# Returns how many attempts were still held.
SETTLE = (
    _NOW
    + """
local prefix = ARGV[1]
local attempts = cmsgpack.unpack(ARGV[8])
-- First the acks, so the stream entries of this batch can be numbered in one step.
local held = {}
for _, attempt in ipairs(attempts) do
  if redis.call('ZREM', KEYS[1], attempt[1]) == 1 then held[#held + 1] = attempt end
end
local seq = 0
if #held > 0 then seq = redis.call('HINCRBY', KEYS[6], 'timings', #held) - #held end
local done = {}
for _, attempt in ipairs(held) do
  local id, outcome, start, finish, err, msg, due, task, wait, number = unpack(attempt)
  local key = prefix .. id
  if outcome == 'COMPLETED' then
    redis.call('HSET', key, 'state', 'COMPLETED', 'started_at', start, 'finished_at', finish, 'error', err)
    done[#done + 1] = finish
    done[#done + 1] = id
  elseif msg == '' then
    -- FAILED, or TIMED_OUT with no attempt left.
    redis.call('HSET', key, 'state', 'FAILED', 'started_at', start, 'finished_at', finish, 'error', err)
    redis.call('ZADD', KEYS[3], finish, id)
  else
    redis.call('HSET', key, 'msg', msg, 'started_at', start, 'finished_at', finish, 'error', err)
    if due > now then
      redis.call('HSET', key, 'state', 'DELAYED', 'due_at', due)
      redis.call('ZADD', KEYS[4], due, id)
    else
      to_waiting(KEYS[5], KEYS[6], key, id, nil)
    end
  end
  seq = seq + 1
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[5], '*', 'seq', seq, 'job', id, 'task', task,
    'outcome', outcome, 'attempt', number, 'wait', wait, 'proc', finish - start,
    'start', start, 'finish', finish, 'worker', ARGV[7], 'error', string.sub(err, 1, 500))
end
if #done > 0 then redis.call('ZADD', KEYS[2], unpack(done)) end
retain(KEYS[2], tonumber(ARGV[3]), KEYS[6], 'evicted_completed', prefix)
retain(KEYS[3], tonumber(ARGV[4]), KEYS[6], 'evicted_failed', prefix)
local minute = ARGV[2] .. math.floor(now / 60000)
local figures = cmsgpack.unpack(ARGV[9])
local names = {'wait_max', 'proc_max', 'total_max'}
for k = 1, 3 do
  if figures[k] > tonumber(redis.call('HGET', minute, names[k]) or '-1') then
    redis.call('HSET', minute, names[k], figures[k])
  end
end
local totals = {n = true, completed = true, failed = true, retried = true}
for field, amount in pairs(figures[4]) do
  redis.call('HINCRBY', minute, field, amount)
  if totals[field] then redis.call('HINCRBY', KEYS[6], 'total_' .. field, amount) end
end
redis.call('EXPIRE', minute, ARGV[6])
return #held
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
  redis.call('ZREM', KEYS[1], id)
  to_waiting(KEYS[2], KEYS[3], ARGV[1] .. id, id, nil)
end
return #ids
"""
)

# Extends the leases of jobs a live worker still holds (never re-adds one
# that was acked or reaped meanwhile).
# KEYS: active
# ARGV: lease_ms, local ids...
RENEW = (
    _NOW
    + """
local until_ms = now + tonumber(ARGV[1])
for k = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[k]) end
return #ARGV - 1
"""
)

# Returns jobs whose worker is gone: those given (a worker process that died),
# or else every job whose lease has expired. Each counts a stall; a job that
# stalls more than `max_stalls` times fails instead of looping. A returned job
# goes back to where it stood in its priority band (its original seq).
# KEYS: active, waiting, failed, counters
# ARGV: job_prefix, max_stalls, keep_failed, reason, batch, local ids...
# Returns {requeued, failed}.
REAP = (
    _NOW
    + """
local prefix = ARGV[1]
local ids = {}
if #ARGV > 5 then
  for k = 6, #ARGV do
    if redis.call('ZREM', KEYS[1], ARGV[k]) == 1 then ids[#ids + 1] = ARGV[k] end
  end
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
  if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
end
local requeued, failed = 0, 0
for _, id in ipairs(ids) do
  local key = prefix .. id
  local stalls = redis.call('HINCRBY', key, 'stalls', 1)
  redis.call('HINCRBY', KEYS[4], 'stalled', 1)
  if stalls > tonumber(ARGV[2]) then
    fail(key, id, KEYS[3], 'stalled ' .. stalls .. ' times (' .. ARGV[4] .. ')', tonumber(ARGV[3]), KEYS[4], prefix)
    failed = failed + 1
  else
    to_waiting(KEYS[2], KEYS[4], key, id, redis.call('HGET', key, 'seq'))
    requeued = requeued + 1
  end
end
return {requeued, failed}
"""
)

# Gives back jobs a worker took but never started (its prefetch buffer at
# shutdown): to where they stood, with the take not counted as an attempt.
# KEYS: active, waiting, counters
# ARGV: job_prefix, local ids...
# Returns how many went back.
HAND_BACK = (
    _NOW
    + """
local back = 0
for k = 2, #ARGV do
  local id = ARGV[k]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = ARGV[1] .. id
    redis.call('HINCRBY', key, 'attempts', -1)
    to_waiting(KEYS[2], KEYS[3], key, id, redis.call('HGET', key, 'seq'))
    back = back + 1
  end
end
return back
"""
)

# Puts failed jobs back to waiting with a fresh message (fresh attempt count).
# Only a job still in the failed set moves, so two concurrent calls move it once.
# KEYS: failed, waiting, counters
# ARGV: job_prefix, (local id, msg) pairs...
# Returns the local ids that moved.
RETRY_FAILED = (
    _NOW
    + """
local moved = {}
for k = 2, #ARGV, 2 do
  local id = ARGV[k]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = ARGV[1] .. id
    redis.call('HSET', key, 'msg', ARGV[k + 1], 'attempts', 0, 'stalls', 0, 'error', '')
    redis.call('HDEL', key, 'started_at', 'finished_at', 'worker')
    to_waiting(KEYS[2], KEYS[3], key, id, nil)
    moved[#moved + 1] = id
  end
end
return moved
"""
)

# A worker's heartbeat: its entry in the registry, stamped on the Redis clock.
# KEYS: workers, worker
# ARGV: worker_id, ttl_s, field/value pairs...
HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'heartbeat_at', now, unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return now
"""
)
