-- POST real MNIST digits round-robin: one JSON body per line of $BENCH_BODIES.
-- Extra headers come from $BENCH_HEADERS as "Name: value" lines. done() prints one
-- BENCH_JSON line that bench/harness.py reads.

local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local bodies = {}
local index = 1
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  for line in io.lines(os.getenv("BENCH_BODIES")) do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  local extra = os.getenv("BENCH_HEADERS") or ""
  for name, value in extra:gmatch("([^:\n]+):%s*([^\n]*)") do
    headers[name] = value
  end
  -- each thread starts at another digit so the threads do not send in lockstep
  index = ((tid or 0) * 37) % #bodies + 1
end

function request()
  local body = bodies[index]
  index = index % #bodies + 1
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"status_errors": %d, "socket_errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
