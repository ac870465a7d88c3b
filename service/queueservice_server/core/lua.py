"""Every Lua script the service runs, in one place.

Scripts take their clock from Redis `TIME`, so every host stamps jobs with the
same clock. Job ids inside the sorted sets are local ids (the part after
`queue:`); job hash keys are the queue's job prefix plus that id. Field names
are those of `keys.py`.

Every state change is one script, and every script is safe to run twice with
the same arguments (a client whose connection broke may send it again, and a
worker re-sends what it could not confirm): each header says why. A job that
a worker holds is fenced by its token, the attempt number and holder that
TAKE wrote into the job's hash: a script given a stale token changes nothing
and says so.
"""

# Shared prologue: `now` in milliseconds from the Redis clock, and the helpers.
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
-- Whether the job in `key` is still held under this token (the attempt and holder TAKE wrote).
local function holds(key, attempt, holder)
  local job = redis.call('HMGET', key, 'attempts', 'worker')
  return job[1] == tostring(attempt) and job[2] == holder
end
-- Per-minute figures of the attempts a script recorded (see timings.py): counted
-- here, over exactly what was written, so a re-sent or stale batch adds nothing.
local LOG_RATIO = math.log(1.25)
local function bucket(ms)
  if ms < 1 then return 0 end
  return math.floor(math.log(ms) / LOG_RATIO) + 1
end
-- Bucket field names, built once per script run: most attempts of a batch share them.
local NAMES = {w = {}, p = {}, t = {}}
local function count(figures, kind, ms)
  local b = bucket(ms)
  local field = NAMES[kind][b]
  if not field then
    field = kind .. ':' .. b
    NAMES[kind][b] = field
  end
  figures[field] = (figures[field] or 0) + 1
end
local function tally(figures, move, wait, proc)
  local total = wait + proc
  figures.n = (figures.n or 0) + 1
  figures[move] = (figures[move] or 0) + 1
  count(figures, 'w', wait)
  count(figures, 'p', proc)
  count(figures, 't', total)
  figures.wait_sum = (figures.wait_sum or 0) + wait
  figures.proc_sum = (figures.proc_sum or 0) + proc
  figures.total_sum = (figures.total_sum or 0) + total
  figures.wait_max = math.max(figures.wait_max or 0, wait)
  figures.proc_max = math.max(figures.proc_max or 0, proc)
  figures.total_max = math.max(figures.total_max or 0, total)
end
local TOTALS = {n = 'total_n', completed = 'total_completed', failed = 'total_failed', retried = 'total_retried'}
local MAXIMA = {wait_max = true, proc_max = true, total_max = true}
local function write_figures(figures, minute_prefix, ttl, counters)
  if not figures.n then return end
  local minute = minute_prefix .. math.floor(now / 60000)
  for field, amount in pairs(figures) do
    if MAXIMA[field] then
      if amount > tonumber(redis.call('HGET', minute, field) or '-1') then redis.call('HSET', minute, field, amount) end
    else
      redis.call('HINCRBY', minute, field, amount)
      if TOTALS[field] then redis.call('HINCRBY', counters, TOTALS[field], amount) end
    end
  end
  redis.call('EXPIRE', minute, ttl)
end
-- The first `n` bytes of `s`, cut back to the start of a UTF-8 character (at most 3 bytes:
-- 0x80-0xBF continue a character), so a stored error never ends inside one.
local function clip(s, n)
  if #s <= n then return s end
  local cut = n
  while cut > n - 3 do
    local next_byte = string.byte(s, cut + 1)
    if next_byte < 0x80 or next_byte >= 0xC0 then break end
    cut = cut - 1
  end
  return string.sub(s, 1, cut)
end
-- One timings stream entry; `seq` numbers the queue's entries so readers can tell what they missed.
local function emit(stream, maxlen, seq, id, task, outcome, attempt, wait, start, finish, worker, err)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'seq', seq, 'job', id, 'task', task,
    'outcome', outcome, 'attempt', attempt, 'wait', wait, 'proc', finish - start,
    'start', start, 'finish', finish, 'worker', worker, 'error', clip(err, 500))
end
-- A job that fails outside any worker's outcome (stalled too often, no record): its
-- record, its timings entry and its figures, like any other failed attempt.
local function fail_recorded(key, id, failed, error, keep, counters, prefix, stream, maxlen, figures)
  local job = redis.call('HMGET', key, 'task', 'attempts', 'ready_at', 'started_at', 'worker')
  local start = tonumber(job[4] or '') or now
  local wait = math.max(0, start - (tonumber(job[3] or '') or start))
  redis.call('HSET', key, 'state', 'FAILED', 'finished_at', now, 'error', error)
  redis.call('ZADD', failed, now, id)
  retain(failed, keep, counters, 'evicted_failed', prefix)
  emit(stream, maxlen, redis.call('HINCRBY', counters, 'timings', 1), id, job[1] or '', 'FAILED',
    tonumber(job[2] or '0'), wait, start, now, job[5] or '', error)
  tally(figures, 'failed', wait, math.max(0, now - start))
end
"""

# Creates a batch of jobs of one queue, or for a known idempotency key returns
# the first job of that key. The batch comes as one msgpack argument, so a
# thousand jobs cost one command to parse rather than fifteen thousand.
# With a cap (ARGV[5] > 0) on waiting + delayed jobs, a call whose new jobs
# would take the queue past it writes nothing and answers {'FULL', count}: all
# or nothing per call. Jobs it would not create (an existing id, a known
# idempotency key, a key repeated within the batch) do not count, so repeats
# are never refused.
# Safe to re-run: job ids are random and chosen by the caller, so a job whose
# record exists was written by an earlier run of this very call; it is
# returned as it is, never overwritten (a worker may have taken it meanwhile),
# and counts as nothing new against the cap. A refused run wrote nothing.
# KEYS: waiting, delayed, counters
# ARGV: job_prefix, idempotency_prefix, idempotency_ttl_ms, jobs: a msgpack list of
#       [local_id, msg, task, priority, delay_ms, due_at_ms, max_attempts, timeout_ms, idempotency_key],
#       max_waiting (0 = no cap)
# Returns per job: local id (the first job's, for a known key), deduplicated (0/1), enqueued_at_ms;
# or {'FULL', waiting + delayed} when the cap refused the call.
ENQUEUE = (
    _NOW
    + """
local jobs = cmsgpack.unpack(ARGV[4])
local cap = tonumber(ARGV[5] or '0')
if cap > 0 then
  local present = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  local fresh, keys = 0, {}
  for _, job in ipairs(jobs) do
    local id, idem = job[1], job[9]
    if redis.call('EXISTS', ARGV[1] .. id) == 0 and not (idem ~= '' and (keys[idem]
        or redis.call('EXISTS', ARGV[2] .. idem) == 1)) then
      fresh = fresh + 1
    end
    if idem ~= '' then keys[idem] = true end
  end
  if fresh > 0 and present + fresh > cap then return {'FULL', present} end
end
local out = {}
local seq = redis.call('HINCRBY', KEYS[3], 'seq', #jobs) - #jobs
for _, job in ipairs(jobs) do
  local id, msg, task, priority, delay, due, max_attempts, timeout, idem = unpack(job)
  local key = ARGV[1] .. id
  local idem_key, existing = nil, nil
  if idem ~= '' then
    idem_key = ARGV[2] .. idem
    existing = redis.call('GET', idem_key)
  end
  if existing and existing ~= id then
    out[#out + 1] = existing
    out[#out + 1] = 1
    out[#out + 1] = redis.call('HGET', ARGV[1] .. existing, 'enqueued_at') or now
  elseif redis.call('EXISTS', key) == 1 then
    out[#out + 1] = id
    out[#out + 1] = 0
    out[#out + 1] = redis.call('HGET', key, 'enqueued_at')
  else
    seq = seq + 1
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
# under a lease, each fenced by its new attempt number and the holder. With a
# rate limit, takes only as many as the sliding window has room for, and
# otherwise says how long until a token frees up (only when jobs wait: an
# empty queue never says "wait"); a worker waits for a token, it never takes a
# job to put it back. A member with no job record (written by hand) is failed
# with an error, not dropped.
# Safe to re-run: the call's token and the ids it took are kept for one lease
# under the holder's take key; a second run with the same token returns those
# jobs (the ones the holder still holds) instead of taking more, so a reply
# lost on the way orphans no lease.
# KEYS: waiting, active, limiter, counters, failed, take (the holder's), timings
# ARGV: count, lease_ms, holder, job_prefix, limit_max, limit_window_ms,
#       limit_slack_ms, keep_failed, token, stream_maxlen, minute_prefix, minute_ttl_s
# Returns {now, wait_ms, then per job: local id, msg, ready_at, attempt, task}.
TAKE = (
    _NOW
    + """
local prefix, holder, token = ARGV[4], ARGV[3], ARGV[9]
local last = redis.call('GET', KEYS[6])
if last then
  local sep = string.find(last, ' ', 1, true)
  if string.sub(last, 1, sep - 1) == token then
    local out = {now, 0}
    for id in string.gmatch(string.sub(last, sep + 1), '[^,]+') do
      local job = redis.call('HMGET', prefix .. id, 'msg', 'ready_at', 'task', 'attempts', 'worker')
      if job[5] == holder and redis.call('ZSCORE', KEYS[2], id) then
        out[#out + 1] = id
        out[#out + 1] = job[1]
        out[#out + 1] = job[2] or now
        out[#out + 1] = tonumber(job[4])
        out[#out + 1] = job[3] or ''
      end
    end
    return out
  end
end
local count = tonumber(ARGV[1])
local ids = redis.call('ZRANGE', KEYS[1], 0, count - 1)
local out = {now, 0}
if #ids == 0 then return out end
local limit = tonumber(ARGV[5])
local takes = {}
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
  while #ids > limit - used do table.remove(ids) end
end
redis.call('ZREM', KEYS[1], unpack(ids))
local leases, taken, figures = {}, {}, {}
local until_ms = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  local key = prefix .. id
  local job = redis.call('HMGET', key, 'msg', 'ready_at', 'task', 'attempts')
  if job[1] then
    leases[#leases + 1] = until_ms
    leases[#leases + 1] = id
    taken[#taken + 1] = id
    local attempt = tonumber(job[4] or '0') + 1
    redis.call('HSET', key, 'state', 'ACTIVE', 'attempts', attempt, 'started_at', now, 'worker', holder,
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
    fail_recorded(key, id, KEYS[5], 'no job record: a member was written into the waiting set by hand',
      tonumber(ARGV[8]), KEYS[4], prefix, KEYS[7], ARGV[10], figures)
  end
end
if #leases > 0 then
  redis.call('ZADD', KEYS[2], unpack(leases))
  redis.call('SET', KEYS[6], token .. ' ' .. table.concat(taken, ','), 'PX', ARGV[2])
end
if #takes > 0 then redis.call('ZADD', KEYS[3], unpack(takes)) end
write_figures(figures, ARGV[11], ARGV[12], KEYS[4])
return out
"""
)

# Records a batch of finished attempts (one queue): outcome and times on the
# job record, the finished sets with retention, a retry's next move (when the
# attempt carries the next one's message; else a failed or timed-out attempt
# fails the job), one timings stream entry per attempt, and the per-minute
# figures and running totals of exactly the attempts it recorded.
# Safe to re-run: an attempt is recorded only while its job is in the active
# set under the attempt's token, and recording removes it from there; a
# re-sent or stale attempt (its lease was reaped, the job taken again) changes
# nothing and is not counted. A re-sent attempt that an earlier run recorded
# (same token, finish time on the record) is not reported as stale.
# KEYS: active, completed, failed, delayed, waiting, counters, timings
# ARGV: job_prefix, minute_prefix, keep_completed, keep_failed, stream_maxlen,
#       minute_ttl_s, attempts (msgpack list of timings.attempt_args)
# Returns the local ids of the attempts it did not record (stale tokens).
SETTLE = (
    _NOW
    + """
local prefix = ARGV[1]
local attempts = cmsgpack.unpack(ARGV[7])
-- First the fence and the acks, so the stream entries of this batch can be numbered in one step.
local held, stale = {}, {}
for _, attempt in ipairs(attempts) do
  local id, number, holder = attempt[1], tostring(attempt[10]), attempt[11]
  local key = prefix .. id
  local job = redis.call('HMGET', key, 'attempts', 'worker')
  local mine = job[1] == number and job[2] == holder
  if mine and redis.call('ZREM', KEYS[1], id) == 1 then
    held[#held + 1] = attempt
  elseif not (mine and tonumber(redis.call('HGET', key, 'finished_at')) == attempt[4]) then
    stale[#stale + 1] = id
  end
end
local seq = 0
if #held > 0 then seq = redis.call('HINCRBY', KEYS[6], 'timings', #held) - #held end
local done, figures = {}, {}
for _, attempt in ipairs(held) do
  local id, outcome, start, finish, err, msg, due, task, wait, number, holder = unpack(attempt)
  local key = prefix .. id
  local move = 'retried'
  if outcome == 'COMPLETED' then
    move = 'completed'
    redis.call('HSET', key, 'state', 'COMPLETED', 'started_at', start, 'finished_at', finish, 'error', err)
    done[#done + 1] = finish
    done[#done + 1] = id
  elseif msg == '' then
    -- FAILED, or TIMED_OUT with no attempt left.
    move = 'failed'
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
  emit(KEYS[7], ARGV[5], seq, id, task, outcome, number, wait, start, finish, holder, err)
  tally(figures, move, wait, finish - start)
end
if #done > 0 then redis.call('ZADD', KEYS[2], unpack(done)) end
retain(KEYS[2], tonumber(ARGV[3]), KEYS[6], 'evicted_completed', prefix)
retain(KEYS[3], tonumber(ARGV[4]), KEYS[6], 'evicted_failed', prefix)
write_figures(figures, ARGV[2], ARGV[6], KEYS[6])
return stale
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

# Extends the leases of jobs a live consumer's processes still hold, fenced by
# their tokens, and stamps the consumer's heartbeat on the queue (the reaper
# leaves alone the unexpired jobs of a consumer that stamps it).
# Safe to re-run: it only sets deadlines and a timestamp.
# KEYS: active, consumers
# ARGV: lease_ms, consumer_id, job_prefix, stall_ms, then (local id, attempt, holder) triples
# Returns the local ids it could not renew: no longer held under that token.
RENEW = (
    _NOW
    + """
local until_ms = now + tonumber(ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[2])
-- Consumers gone for ten stall intervals are forgotten.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 10 * tonumber(ARGV[4]))
local lost = {}
for k = 5, #ARGV, 3 do
  local id = ARGV[k]
  if redis.call('ZSCORE', KEYS[1], id) and holds(ARGV[3] .. id, ARGV[k + 1], ARGV[k + 2]) then
    redis.call('ZADD', KEYS[1], 'XX', until_ms, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

# Returns jobs whose worker is gone: those given with their tokens (a worker
# process that died), or else jobs whose lease has expired, unless the
# holder's consumer renewed on this queue within one lease and the job's
# lease ran out less than one lease ago (a live consumer renews what it
# holds; one that stopped renewing a job for that long has lost track of it;
# a dead consumer's jobs are back within lease + reaper period, one stall
# interval). Each
# counts a stall; a job that stalls more than `max_stalls` times fails,
# with its timings entry and figures. A returned job goes back to where it
# stood in its priority band (its original seq).
# Safe to re-run: a job is returned only while it is in the active set (under
# the given token, when one is given), and returning removes it from there.
# KEYS: active, waiting, failed, counters, consumers, timings
# ARGV: job_prefix, max_stalls, keep_failed, reason, batch, lease_ms, stream_maxlen,
#       minute_prefix, minute_ttl_s, then (local id, attempt, holder) triples
# Returns {requeued, failed}.
REAP = (
    _NOW
    + """
local prefix = ARGV[1]
local lease_ms = tonumber(ARGV[6])
local ids = {}
if #ARGV > 9 then
  for k = 10, #ARGV, 3 do
    local id = ARGV[k]
    if redis.call('ZSCORE', KEYS[1], id) and holds(prefix .. id, ARGV[k + 1], ARGV[k + 2]) then
      ids[#ids + 1] = id
    end
  end
else
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
  for k = 1, #expired, 2 do
    local id, deadline = expired[k], tonumber(expired[k + 1])
    local holder = redis.call('HGET', prefix .. id, 'worker') or ''
    local beat = redis.call('ZSCORE', KEYS[5], string.match(holder, '^(.*):[^:]*$') or holder)
    if not (beat and tonumber(beat) >= now - lease_ms and deadline >= now - lease_ms) then
      ids[#ids + 1] = id
    end
  end
end
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
local requeued, failed, figures = 0, 0, {}
for _, id in ipairs(ids) do
  local key = prefix .. id
  local stalls = redis.call('HINCRBY', key, 'stalls', 1)
  redis.call('HINCRBY', KEYS[4], 'stalled', 1)
  if stalls > tonumber(ARGV[2]) then
    fail_recorded(key, id, KEYS[3], 'stalled ' .. stalls .. ' times (' .. ARGV[4] .. ')', tonumber(ARGV[3]),
      KEYS[4], prefix, KEYS[6], ARGV[7], figures)
    failed = failed + 1
  else
    to_waiting(KEYS[2], KEYS[4], key, id, redis.call('HGET', key, 'seq'))
    requeued = requeued + 1
  end
end
write_figures(figures, ARGV[8], ARGV[9], KEYS[4])
return {requeued, failed}
"""
)

# Gives back jobs a worker took but never started (its prefetch buffer at
# shutdown), or whose process is known dead (killed past the shutdown grace):
# to where they stood, with the take not counted as an attempt.
# Safe to re-run: a job moves only while it is in the active set under the
# given token, and moving removes it from there.
# KEYS: active, waiting, counters
# ARGV: job_prefix, then (local id, attempt, holder) triples
# Returns how many went back.
HAND_BACK = (
    _NOW
    + """
local back = 0
for k = 2, #ARGV, 3 do
  local id = ARGV[k]
  local key = ARGV[1] .. id
  if redis.call('ZSCORE', KEYS[1], id) and holds(key, ARGV[k + 1], ARGV[k + 2]) then
    redis.call('ZREM', KEYS[1], id)
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
