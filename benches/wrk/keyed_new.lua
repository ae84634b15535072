-- Keyed POST, 1 KiB body, a new Idempotency-Key on every request: first executions.
-- Args: <seed>. Keys are <seed>-<thread>-<counter>; load.sh passes a seed unique per run, so keys
-- never repeat across runs.
count_statuses = true
dofile(os.getenv("WRK_LIB"))

local prefix, suffix, key_base
local counter = 0

function init(args)
  prefix, suffix = keyed_request_parts(wrk.path)
  key_base = (args[1] or tostring(os.time())) .. "-" .. tostring(tid or 0) .. "-"
end

function request()
  counter = counter + 1
  return prefix .. key_base .. counter .. suffix
end
