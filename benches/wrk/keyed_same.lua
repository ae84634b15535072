-- Keyed POST, 1 KiB body, the same Idempotency-Key on every request: replays (load.sh creates
-- the key's record before the run). Args: <key>. Static request.
count_statuses = true
dofile(os.getenv("WRK_LIB"))
wrk.method = "POST"
wrk.body = body_1k
wrk.headers["Content-Type"] = "application/json"

function init(args)
  wrk.headers["Idempotency-Key"] = assert(args[1], "usage: keyed_same.lua -- <key>")
end
