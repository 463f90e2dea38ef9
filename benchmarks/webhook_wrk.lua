-- wrk script used by benchmarks/webhook_throughput.py: POST pre-signed Telnyx events.
--
--   wrk -t T -c C -d 10s -s webhook_wrk.lua http://127.0.0.1:PORT -- <events prefix> <path>
--
-- Thread i reads "<prefix>.<i>": one event per line, "timestamp<TAB>signature<TAB>body". Each
-- thread sends its own events in order, so no event id is sent twice unless a thread runs out
-- (counted as "wraps"). The result is one line "BENCH_RESULT {json}" for the Python side.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

function init(args)
   local prefix, path = args[1], args[2]
   reqs = {}
   local f = assert(io.open(prefix .. "." .. tid, "rb"))
   for line in f:lines() do
      local a = line:find("\t", 1, true)
      local b = line:find("\t", a + 1, true)
      local headers = {
         ["Content-Type"] = "application/json",
         ["telnyx-timestamp"] = line:sub(1, a - 1),
         ["telnyx-signature-ed25519"] = line:sub(a + 1, b - 1),
      }
      reqs[#reqs + 1] = wrk.format("POST", path, headers, line:sub(b + 1))
   end
   f:close()
   assert(#reqs > 0, "no events in " .. prefix .. "." .. tid)
   index, sent, wraps, non2xx, dups = 0, 0, 0, 0, 0
end

function request()
   index = index + 1
   if index > #reqs then
      index = 1
      wraps = wraps + 1
   end
   sent = sent + 1
   return reqs[index]
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   if body and body:find('"duplicate": true', 1, true) then
      dups = dups + 1
   end
end

function done(summary, latency, requests)
   local sent, wraps, non2xx, dups = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      sent = sent + thread:get("sent")
      wraps = wraps + thread:get("wraps")
      non2xx = non2xx + thread:get("non2xx")
      dups = dups + thread:get("dups")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"duration_us": %d, "completed": %d, "sent": %d, "wraps": %d,'
         .. ' "non2xx": %d, "duplicates": %d, "socket_errors": %d, "timeouts": %d,'
         .. ' "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.duration, summary.requests, sent, wraps, non2xx, dups,
      e.connect + e.read + e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
