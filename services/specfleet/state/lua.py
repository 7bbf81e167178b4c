"""Lua scripts that make each state-store write atomic; times come from the Redis server clock (one clock per fleet)."""

_NOW_MS = """
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
"""

# KEYS[1] request hash. ARGV: prompt, params JSON, owner, running_ttl_s (0: none).
# Returns {created 0|1, HGETALL}; an existing request is returned unchanged.
CREATE_REQUEST = (
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1])}
end
"""
    + _NOW_MS
    + """
redis.call('HSET', KEYS[1], 'prompt', ARGV[1], 'output', '', 'offsets', '', 'round', '0', 'status', 'running',
  'params', ARGV[2], 'finish_reason', '', 'created', now, 'updated', now, 'owner', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return {1, redis.call('HGETALL', KEYS[1])}
"""
)

# The commit itself (checks, then the round appended), shared by COMMIT_ROUND and COMMIT_AND_ANSWER: it returns
# early for every outcome but "applied", and falls through after applying.
_COMMIT = (
    """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return {'missing'} end
local stored = tonumber(redis.call('HGET', key, 'round'))
local want = tonumber(ARGV[1])
if stored > want then return {'retry', redis.call('HGETALL', key)} end
if stored < want then return {'gap', redis.call('HGETALL', key)} end
if redis.call('HGET', key, 'status') ~= 'running' then return {'closed', redis.call('HGETALL', key)} end
local output = redis.call('HGET', key, 'output') or ''
local offsets = redis.call('HGET', key, 'offsets') or ''
"""
    + _NOW_MS
    + """
redis.call('HSET', key, 'output', output .. ARGV[2], 'offsets', offsets .. struct.pack('<i4', #output / 4),
  'round', string.format('%d', stored + 1), 'updated', now)
if ARGV[3] == '1' then
  redis.call('HSET', key, 'status', 'finished', 'finish_reason', ARGV[4])
  redis.call('EXPIRE', key, ARGV[5])
elseif tonumber(ARGV[6]) > 0 then
  redis.call('EXPIRE', key, ARGV[6])
end
"""
)

# KEYS[1] request hash. ARGV: round, packed tokens, finished 0|1, finish_reason, finished_ttl_s, running_ttl_s.
# Returns {outcome, HGETALL} with outcome applied | retry (round already committed) | gap | closed, or {missing}.
COMMIT_ROUND = _COMMIT + """
return {'applied', redis.call('HGETALL', key)}
"""

# KEYS[1] request hash. ARGV: reason, finished_ttl_s. A running request becomes failed; a closed one is unchanged.
# Returns HGETALL, or nil when the request does not exist.
FAIL_REQUEST = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('HGET', KEYS[1], 'status') == 'running' then
"""
    + _NOW_MS
    + """
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finish_reason', ARGV[1], 'updated', now)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] scores hash. ARGV: field, value, smoothing. new = value for a first sample, else (1-a)*old + a*value.
# Returns the new score as a decimal string (a Lua number would be truncated to an integer reply).
UPDATE_SCORE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local value = tonumber(ARGV[2])
local new = value
if old then new = (1 - tonumber(ARGV[3])) * tonumber(old) + tonumber(ARGV[3]) * value end
local text = string.format('%.17g', new)
redis.call('HSET', KEYS[1], ARGV[1], text)
return text
"""

# COMMIT_ROUND, and when it applies, the verify job's answer in the same script: the reply appended to the router's
# reply stream (capped, its TTL refreshed) and the job acknowledged and deleted. One Redis round trip per round for
# the commit and the answer, and a job is never acknowledged without both. Any other outcome touches no stream (the
# caller answers with the committed round or the error, as after COMMIT_ROUND).
# KEYS[1] request hash, KEYS[2] job stream, KEYS[3] reply stream. ARGV[1..6] as COMMIT_ROUND; ARGV[7] group,
# ARGV[8] job entry id, ARGV[9] reply payload, ARGV[10] reply stream TTL s, ARGV[11] reply stream max length.
# Returns {'applied'} (the state is not read back) or COMMIT_ROUND's reply for any other outcome.
COMMIT_AND_ANSWER = _COMMIT + """
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], '*', 'd', ARGV[9])
redis.call('EXPIRE', KEYS[3], ARGV[10])
redis.call('XACK', KEYS[2], ARGV[7], ARGV[8])
redis.call('XDEL', KEYS[2], ARGV[8])
return {'applied'}
"""
