-- Retry storm: every connection sends the same key at once, and the key changes every <wave>
-- requests (counted over the thread; run with one wrk thread). In each wave the first request
-- executes, the ones arriving while it is in flight get 409, the rest are replays.
-- Args: <seed> [wave = 320]. Keys are <seed>-w<wave number>, new in every run.
count_statuses = true
dofile(os.getenv("WRK_LIB"))

local prefix, suffix, key_base, wave
local counter = 0

function init(args)
  prefix, suffix = keyed_request_parts(wrk.path)
  key_base = (args[1] or tostring(os.time())) .. "-w"
  wave = tonumber(args[2]) or 320
end

function request()
  local key = key_base .. math.floor(counter / wave)
  counter = counter + 1
  return prefix .. key .. suffix
end
